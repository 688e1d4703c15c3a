"""Shared fixtures: tests import the stage files from the repo root and run on 1-2 CPU threads."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# important! every test (and the scripts they start) runs the exercise's torch._int_mm, also on a CPU
# where integer.py would pick oneDNN's linear: what grades an exercise must not depend on the CPU
os.environ["DIT4BIT_GEMM"] = "int_mm"


@pytest.fixture
def fake_fmnist(tmp_path):
    """A tiny Fashion-MNIST look-alike (gz IDX files) so no test needs the Debian package."""
    import data
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        img_f, lab_f = data.FILES[split]
        data.write_idx(str(tmp_path / img_f), imgs)
        data.write_idx(str(tmp_path / lab_f), labels)
    return str(tmp_path)


def save_random_tiny(path, std=0.02):
    """A one-block DiT-T/4 with random (non-zero, also the output layers) weights, saved by our
    writer."""
    import dit
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=1)
    for p in m.parameters():
        if p.requires_grad:
            p.data.normal_(0, std)
    dit.save_checkpoint(path, m, {"model": dit.TINY, "depth": 1})
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    return save_random_tiny(str(tmp_path / "tiny.pt"))


def run_script(*args, timeout=300):
    """Runs `python args...` in the repo root as a user would; returns the CompletedProcess."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_main(script, *args):
    """Runs `python script args...` inside this process: the script's main() under common.run_cli,
    as its `__main__` block does, with sys.argv, the working folder, stdout and stderr swapped in.
    Returns what run_script returns (returncode, stdout, stderr). Use it for CLI checks that end
    before any work (bad flags, refused paths, corrupt files): a new interpreter costs 3-6 s of
    Python and torch start-up per call on a 2-core CPU, most of the student tier's time."""
    import contextlib
    import importlib
    import io
    import subprocess
    import common
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script, *args]  # important! main() parses sys.argv[1:], as in a real run
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            common.run_cli(main)
    except SystemExit as e:  # argparse and run_cli end a refused run this way
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def lesson_output(*args):
    """stdout of a stage file's lesson (its no-argument run, or with the given small setting)."""
    r = run_script(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
