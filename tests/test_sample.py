"""sample.py: the CLI end to end on 2 images x 2 steps, determinism, npz format, bad input."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffusion
import dit
import sample
from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_process(*args):
    """`python sample.py args...` in a new interpreter: the real entry point, start-up and all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def run_cli(*args):
    """sample.py's main() in this process, as its entry point runs it (seconds cheaper per call)."""
    return run_main("sample.py", *args)


def test_cli_end_to_end_is_deterministic(tmp_path, tiny_ckpt):
    a, b, z = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "s.npz"
    r = run_process("--ckpt", tiny_ckpt, "--n", "2", "--steps", "2", "--out", str(a), "--npz", str(z))
    assert r.returncode == 0, r.stderr
    assert "2 images" in r.stdout and "ddim 2 steps" in r.stdout
    sample.main(["--ckpt", tiny_ckpt, "--n", "2", "--steps", "2", "--out", str(b)])
    assert a.read_bytes() == b.read_bytes()  # same seed -> identical PNG bytes
    f = np.load(z)
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (2, 32, 32, 1)
    assert f["labels"].tolist() == [0, 1]


def test_ddpm_and_class_selection(tmp_path, tiny_ckpt):
    out = tmp_path / "g.png"
    sample.main(["--ckpt", tiny_ckpt, "--n", "4", "--steps", "2", "--sampler", "ddpm", "--classes",
                 "7,3",
                 "--out", str(out)])
    assert out.exists()
    assert diffusion.class_labels(5, [7, 3]).tolist() == [7, 3, 7, 3, 7]


def test_noise_does_not_depend_on_batching(tiny_ckpt):
    m, _ = dit.load_checkpoint(tiny_ckpt)
    labels = diffusion.class_labels(4, list(range(10)))
    a = sample.generate(m, labels, steps=2, cfg_scale=2.0, batch_size=4)
    b = sample.generate(m, labels, steps=2, cfg_scale=2.0, batch_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,msg", [
    (["--n", "0"], "argument --n: 0 is out of range"),
    (["--steps", "-3"], "argument --steps: -3 is out of range"),
    (["--eta", "nan"], "argument --eta: nan is not a finite number"),
    (["--eta", "5"], "argument --eta: 5 is out of range"),
    (["--cfg-scale", "inf"], "argument --cfg-scale: inf is not a finite number"),
    (["--seed", "99999999999999999999"], "out of the 64-bit range"),
    (["--out", "checkpoints"], "is a folder"),
    (["--out", "no/such/folder/x.png"], "does not exist"),
    (["--out", "CKPT"], "is also this run's input"),
    (["--npz", "checkpoints/dit_t4.pt"], "would replace a shipped file"),
    (["--classes", "2,12"], "unknown class id"),
    (["--classes", "shoe"], "comma-separated"),
    (["--model", "DiT-XL/2"], "not DiT-XL/2"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_ckpt, args, msg):
    r = run_cli("--ckpt", tiny_ckpt, *[tiny_ckpt if a == "CKPT" else a for a in args])
    assert r.returncode == 2 and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_missing_and_corrupt_checkpoints_exit_2(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    for path, msg in ((str(tmp_path / "none.pt"), "not found"), (str(bad), "cannot read")):
        r = run_cli("--ckpt", path)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--sampler", "heun")
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow
def test_w4a4_calibrates_once_then_loads_the_packed_checkpoint(tmp_path, tiny_ckpt, capsys):
    out = str(tmp_path / "q.png")
    base = ["--ckpt", tiny_ckpt, "--w4a4", "--method", "hadanorm", "--n", "2", "--steps", "2",
            "--out", out]
    sample.main(base)
    first = capsys.readouterr().out
    cache = sample.quantized_path(tiny_ckpt, "w4a4", "hadanorm")
    assert "integer (calibrated" in first and os.path.exists(cache)
    png1 = open(out, "rb").read()
    sample.main(base)
    assert "integer (loaded" in capsys.readouterr().out and open(out, "rb").read() == png1
    ck = torch.load(cache, weights_only=True)
    assert ck["model"]["blocks.0.mlp.fc1.w_int"].dtype == torch.uint8  # packed, two int4 per byte
    assert "blocks.0.mlp.fc1.weight" not in ck["model"]  # no float copy of a quantized weight
    # a changed FP checkpoint makes the cache stale: calibrate again
    fp = torch.load(tiny_ckpt, weights_only=True)
    fp["step"] = 123
    torch.save(fp, tiny_ckpt)
    sample.main(base)
    assert "integer (calibrated" in capsys.readouterr().out


def test_compare_fp_reports_psnr_and_model_mismatch_is_refused(tmp_path, tiny_ckpt, capsys):
    sample.main(["--ckpt", tiny_ckpt, "--w8a8", "--method", "rtn", "--n", "2", "--steps", "2",
                 "--compare-fp",
                 "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "W8A8 rtn integer" in out and "PSNR vs FP" in out
    path = sample.quantized_path(tiny_ckpt, "w8a8", "rtn")
    r = run_cli("--qckpt", path, "--model", "DiT-S/2", "--n", "2")
    assert r.returncode == 2 and "not DiT-S/2" in r.stderr


def test_simulate_agrees_with_integer(tmp_path, tiny_ckpt):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    sample.main(["--ckpt", tiny_ckpt, "--w4a8", "--method", "rtn", "--n", "2", "--steps", "2",
                 "--out",
                 str(tmp_path / "a.png"), "--npz", a])
    sample.main(["--ckpt", tiny_ckpt, "--w4a8", "--method", "rtn", "--n", "2", "--steps", "2",
                 "--simulate",
                 "--out", str(tmp_path / "b.png"), "--npz", b])
    diff = np.abs(np.load(a)["arr_0"].astype(int) - np.load(b)["arr_0"].astype(int))
    assert diff.max() <= 1  # uint8 pixels: equal up to float rounding


def test_quantized_bad_input_exit_2(tmp_path, tiny_ckpt):
    r = run_cli("--ckpt", tiny_ckpt, "--w4a4", "--simulate", "--qckpt", tiny_ckpt)
    assert r.returncode == 2 and "--simulate" in r.stderr
    sample.main(["--ckpt", tiny_ckpt, "--w4a4", "--method", "hadanorm", "--n", "2", "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    path = sample.quantized_path(tiny_ckpt, "w4a4", "hadanorm")
    ck = torch.load(path, weights_only=True)
    # corrupt
    ck["model"]["blocks.0.attn.qkv.w_int"] = ck["model"]["blocks.0.attn.qkv.w_int"].to(torch.int32)
    torch.save(ck, tmp_path / "bad.pt")
    r = run_cli("--qckpt", str(tmp_path / "bad.pt"), "--n", "2")
    assert r.returncode == 2 and "w_int" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--method", "rtn")
    assert r.returncode == 2 and "needs a bit setting" in r.stderr


@pytest.mark.slow
def test_official_checkpoint_with_vae_end_to_end(tmp_path):
    from test_vae import diffusers_state_dict
    torch.manual_seed(0)
    m = dit.DiT_models["DiT-S/4"](input_size=8)  # official layout, learn_sigma: 8 output channels
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    torch.save({"ema": m.state_dict()}, tmp_path / "official.pt")
    torch.save(diffusers_state_dict(), tmp_path / "vae.bin")
    out = tmp_path / "in.png"
    r = run_cli("--ckpt", str(tmp_path / "official.pt"), "--model", "DiT-S/4", "--image-size", "64",
                "--vae", str(tmp_path / "vae.bin"), "--n", "2", "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "DiT-S/4 fp32" in r.stdout
    from PIL import Image
    assert Image.open(out).mode == "RGB"
    r = run_cli("--ckpt", str(tmp_path / "official.pt"), "--model", "DiT-S/4", "--image-size", "64",
                "--n", "1")
    assert r.returncode == 2 and "--vae" in r.stderr
    r = run_cli("--ckpt", str(tmp_path / "official.pt"), "--model", "DiT-S/2", "--image-size", "64",
                "--vae", str(tmp_path / "vae.bin"), "--n", "1")  # a checkpoint of the wrong size
    assert r.returncode == 2 and "shape mismatches" in r.stderr and "Traceback" not in r.stderr


def test_cuda_without_cuda_exit_2(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("--ckpt", tiny_ckpt, "--device", "cuda", "--n", "1")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr


@pytest.mark.parametrize("bits", ["--w8a8", "--w4a8"])
def test_first_run_samples_exactly_what_later_runs_load(tmp_path, tiny_ckpt, bits):
    ckpt = str(tmp_path / "fp.pt")
    shutil.copy(tiny_ckpt, ckpt)  # its own folder: the quantized cache is written beside it
    runs = []
    for i in range(2):
        npz = str(tmp_path / f"{i}.npz")
        sample.main(["--ckpt", ckpt, bits, "--n", "4", "--steps", "3", "--out",
                     str(tmp_path / f"{i}.png"),
                     "--npz", npz, "--compile", "off"])
        runs.append(np.load(npz)["arr_0"])
    # calibrated once, then loaded
    assert len([f for f in os.listdir(tmp_path) if f.endswith("_ditas.pt")]) == 1
    assert np.array_equal(runs[0], runs[1])
