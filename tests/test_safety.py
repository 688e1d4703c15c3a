"""Nothing lost on bad input: outputs never replace inputs or shipped files, writes are atomic,
output paths and numbers are checked before the slow part, nothing non-finite is written, corrupt
files are
one-line errors (or a cache is rebuilt), official train.py checkpoints load."""
import argparse
import os
import time

import numpy as np
import pytest
import torch

import common
import dit
import sample
from conftest import ROOT, run_main, run_script

SHIPPED = os.path.join("checkpoints", "dit_t4.pt")


def one_line_exit_2(r, msg):
    assert r.returncode == 2 and msg in r.stderr, (r.returncode, r.stderr[-800:])
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_outputs_never_replace_an_input_or_a_shipped_file(tmp_path, tiny_ckpt):
    before = {p: os.path.getmtime(os.path.join(ROOT, p)) for p in (SHIPPED, "checkpoints/fm_classifier.pt")}
    t0 = time.time()
    one_line_exit_2(run_main("calibrate.py", "--ckpt", tiny_ckpt, "--out", tiny_ckpt),
                    "is also this run's input")
    one_line_exit_2(run_main("calibrate.py", "--out", SHIPPED), "is also this run's input")
    one_line_exit_2(run_main("qat.py", "train", "--ckpt", tiny_ckpt, "--out", SHIPPED),
                    "would replace a shipped")
    one_line_exit_2(run_main("evaluate.py", "table", "--ckpt", tiny_ckpt, "--out", SHIPPED),
                    "would replace a shipped")
    one_line_exit_2(run_main("evaluate.py", "train-classifier", "--out", "checkpoints/fm_classifier.pt"),
                    "would replace a shipped file")
    one_line_exit_2(run_main("train.py", "--out", SHIPPED, "--run-dir", str(tmp_path / "r")),
                    "shipped file")
    assert time.time() - t0 < 60  # refused before any slow work
    assert before == {p: os.path.getmtime(os.path.join(ROOT, p)) for p in before}


def test_output_paths_are_checked_before_the_slow_part(tmp_path, tiny_ckpt):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    cases = [("calibrate.py", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "no" / "q.pt"), "does not exist"),
             ("calibrate.py", "--ckpt", tiny_ckpt, "--out", str(tmp_path), "is a folder"),
             ("qat.py", "train", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "no" / "q.pt"), "does not exist"),
             ("train.py", "--run-dir", str(tmp_path / "r"), "--out", str(tmp_path / "no" / "m.pt"),
              "does not exist")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(("calibrate.py", "--ckpt", tiny_ckpt, "--out", str(ro / "q.pt"),
                      "is not writable"))
    for *args, msg in cases:
        t0 = time.time()
        one_line_exit_2(run_main(*args), msg)
        assert time.time() - t0 < 30, args


@pytest.mark.parametrize("args, msg", [
    (("train.py", "--log-every", "0"), "argument --log-every: 0 is out of range"),
    (("train.py", "--ckpt-every", "0"), "argument --ckpt-every"),
    (("train.py", "--lr", "nan"), "argument --lr: nan is not a finite number"),
    (("qat.py", "train", "--buckets", "0"), "argument --buckets"),
    (("qat.py", "train", "--ckpt-every", "0"), "argument --ckpt-every"),
    (("qat.py", "train", "--lr", "-1"), "argument --lr"),
    (("qat.py", "train", "--cfg", "nan"), "argument --cfg: nan is not a finite number"),
    (("calibrate.py", "--lora-iters", "0"), "argument --lora-iters"),
    (("calibrate.py", "--calib-n", "0"), "argument --calib-n"),
    (("calibrate.py", "--alpha", "nan"), "argument --alpha: nan is not a finite number"),
    (("calibrate.py", "--method", "gptq"), "unknown method"),
    (("evaluate.py", "table", "--n", "2"), "argument --n/--samples: 2 is out of range"),
    (("evaluate.py", "fp", "--cfg", "inf"), "argument --cfg"),
    (("sample.py", "--seed", "-1"), "argument --seed"),
])
def test_numbers_are_validated_at_parse_time(args, msg):
    one_line_exit_2(run_main(*args), msg)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    from PIL import Image

    def full_disk(self, fp, *a, **k):
        open(fp, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        sample.save_grid(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]), str(path))
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["grid.png"]


def test_npz_is_written_atomically_and_loads(tmp_path):
    p = str(tmp_path / "s.npz")
    sample.save_npz(torch.zeros(2, 1, 32, 32), torch.tensor([3, 4]), p)
    z = np.load(p)
    assert z["arr_0"].shape == (2, 32, 32, 1) and z["labels"].tolist() == [3, 4] and os.listdir(tmp_path) == ["s.npz"]


def test_nothing_non_finite_is_written_or_loaded(tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match="b holds NaN"):
        common.atomic_save({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
                           str(tmp_path / "x.pt"))
    assert "x.pt" not in os.listdir(tmp_path)
    ck = torch.load(tiny_ckpt, weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name][0] = float("inf")
    torch.save(ck, str(tmp_path / "inf.pt"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        dit.load_checkpoint(str(tmp_path / "inf.pt"))
    out = tmp_path / "nan.png"
    one_line_exit_2(run_main("sample.py", "--ckpt", str(tmp_path / "inf.pt"), "--n", "2",
                               "--steps", "2",
                               "--out", str(out)), "NaN or Inf")
    assert not out.exists()


def test_sampling_that_goes_non_finite_writes_nothing(tmp_path, tiny_ckpt):
    ck = torch.load(tiny_ckpt, weights_only=True)
    for k, v in ck["model"].items():
        if k.startswith("final_layer") and v.is_floating_point():
            ck["model"][k] = v * 0 + 6e4  # finite weights, an output that overflows
    bad = str(tmp_path / "big.pt")
    torch.save(ck, bad)
    out = tmp_path / "s.png"
    r = run_main("sample.py", "--ckpt", bad, "--n", "2", "--steps", "4", "--cfg-scale", "90",
                   "--out", str(out))
    if r.returncode == 0:  # this CPU kept it finite: then the grid must be a real one
        assert out.exists()
    else:
        one_line_exit_2(r, "NaN or Inf")
        assert not out.exists()


def test_corrupt_files_are_one_line_errors_naming_the_file(tmp_path, fake_fmnist, tiny_ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a torch file")
    one_line_exit_2(run_main("sample.py", "--ckpt", str(bad), "--n", "2"), str(bad))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(open(tiny_ckpt, "rb").read()[:1000])
    one_line_exit_2(run_main("sample.py", "--qckpt", str(trunc), "--n", "2"), str(trunc))
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "state.pt").write_bytes(b"garbage")
    one_line_exit_2(run_main("train.py", "--run-dir", str(tmp_path / "run"), "--resume",
                               "--data-dir", fake_fmnist,
                               "--iters", "2"), "state.pt")
    gz = os.path.join(fake_fmnist, "train-images-idx3-ubyte.gz")
    open(gz, "wb").write(os.urandom(200))
    one_line_exit_2(run_main("data.py", "--data-dir", fake_fmnist), "train-images-idx3-ubyte.gz")
    np.savez(str(tmp_path / "e.npz"))
    one_line_exit_2(run_main("evaluate.py", "npz", str(tmp_path / "e.npz")), "e.npz")
    np.savez(str(tmp_path / "w.npz"), arr_0=np.zeros((5, 8), np.float32), labels=np.zeros(5))
    one_line_exit_2(run_main("evaluate.py", "npz", str(tmp_path / "w.npz")), "w.npz")


def test_a_corrupt_calibration_cache_is_rebuilt_with_a_warning(tmp_path, tiny_ckpt, capsys):
    png = str(tmp_path / "s.png")
    base = ["--ckpt", tiny_ckpt, "--w8a8", "--method", "rtn", "--n", "2", "--steps", "2", "--out",
            png,
            "--compile", "off"]
    sample.main(base)
    cache = sample.quantized_path(tiny_ckpt, "w8a8", "rtn")
    open(cache, "wb").write(b"broken")
    capsys.readouterr()
    sample.main(base)
    got = capsys.readouterr()
    assert "calibrating it anew" in got.err and "calibrated in" in got.out
    assert sample.made_from(cache, tiny_ckpt)  # the rebuilt cache is whole again


def test_official_train_py_checkpoint_with_its_argparse_namespace_loads(tmp_path):
    m = dit.build("DiT-S/8", input_size=4)
    sd = m.state_dict()
    path = str(tmp_path / "0001000.pt")
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-S/8", lr=1e-4)}, path)
    got = dit.load_official(path, "DiT-S/8", image_size=32)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items())


def test_os_errors_are_one_line():
    r = run_script("-c", f"import sys; sys.path.insert(0, {ROOT!r}); import common\ndef main(): raise PermissionError(13, 'Permission denied', 'x.pt')\ncommon.run_cli(main)")
    one_line_exit_2(r, "x.pt: Permission denied")
