"""The files under checkpoints/ that git ships: each loads with every key and shape, was made from
the shipped FP model, and samples close to it from the same noise; the defaults select them."""
import os
import subprocess

import pytest
import torch

import dit
import integer
import sample
from conftest import ROOT

# PSNR (dB) against the FP model, 10 images (one per class), DDIM 10 steps, seed 0, CFG 4.0 and 1.5.
# Measured on an AVX2 machine: 24.9 / 28.7 (QAT W4A4, the --w4a4 default), 19.6 / 26.5 (QAT W4A3,
# --w4a3 --method hqdm), 25.2 / 29.3 (SVDQuant on HadaNorm W4A4) and 19.1 / 25.4 (the same at W4A3);
# on an AVX-512 one: 19.4 / 23.2 (HadaNorm W4A4), 25.6 / 28.8 and 19.2 / 25.6 (the SVDQuant rows).
# The floors sit 5 dB
# lower: W4A4 sampling is chaotic, and another CPU's float kernels (AMX, other thread counts) can
# flip a 4-bit code that then moves a sample by about as much as quantizing did.
FLOOR = {"dit_t4_w4a4_hqdm.pt": (19.9, 23.7), "dit_t4_w4a3_hqdm.pt": (14.6, 21.5),
         "dit_t4_w4a4_hadanorm.pt": (14.4, 18.2), "dit_t4_w4a4_svdquant-hadanorm.pt": (20.6, 23.8),
         "dit_t4_w4a3_svdquant-hadanorm.pt": (14.2, 20.6)}


def shipped():
    try:
        out = subprocess.run(["git", "ls-files", "checkpoints"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        out = ""
    files = [os.path.basename(f) for f in out.split()] or sorted(os.listdir(os.path.join(ROOT, "checkpoints")))
    return [f for f in files if f.startswith("dit_t4_w")]


@pytest.fixture(scope="module")
def fp_images():
    fp = dit.load_checkpoint(os.path.join(ROOT, dit.DEFAULT_CKPT))[0]
    return {c: sample.generate(fp, torch.arange(10), steps=10, cfg_scale=c, seed=0) for c in (4.0, 1.5)}


def test_every_shipped_quantized_checkpoint_has_a_floor():
    assert shipped() and set(shipped()) <= set(FLOOR), shipped()


@pytest.mark.slow
@pytest.mark.parametrize("name", shipped())
def test_shipped_checkpoint_loads_and_samples_near_fp(name, fp_images):
    path = os.path.join(ROOT, "checkpoints", name)
    model, cfg, recipe = integer.load_quantized(path)  # asserts every key and shape
    assert cfg["model"] == dit.TINY and recipe.integer
    assert sample.made_from(path, os.path.join(ROOT, dit.DEFAULT_CKPT))
    bits, method = name[len("dit_t4_"):-3].split("_", 1)
    assert f"w{recipe.wq.bits}a{recipe.aq.bits}" == bits and recipe.method.startswith(method)
    for c, floor in zip((4.0, 1.5), FLOOR[name]):
        got = sample.psnr(sample.generate(model, torch.arange(10), steps=10, cfg_scale=c, seed=0),
                          fp_images[c])
        assert got >= floor, (name, c, got)


@pytest.mark.parametrize("bits", ["w4a4", "w4a3"])
def test_the_defaults_select_a_shipped_checkpoint(bits):
    args = sample.get_args([f"--{bits}"])
    method = args.method or sample.BEST_METHOD[bits]
    path = sample.quantized_path(args.ckpt, bits, method)
    assert os.path.basename(path) in shipped(), (bits, method, path)
