"""The main job: load the shipped DiT, sample a labelled grid (one row per class), print a report.

    python sample.py                          # 80 images, DDIM 50 steps, CFG 4.0 -> samples.png
    python sample.py --classes 0,7 --n 8 --steps 25 --sampler ddpm --seed 1 --out shoes.png
    python sample.py --npz samples.npz        # also the raw uint8 samples, ADM-suite format
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

# important! Every forward allocates and frees tens of MB of activations; glibc hands each such
# block back to the OS and every call page-faults it in again (a compiled W4A4 forward measured
# 750 ms instead of 440). These settings keep freed memory in the process; glibc reads them only at
# start-up, so a script starts itself again with them (sample.py before torch is imported).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 30),
              "MALLOC_TOP_PAD_": str(2 ** 26)}


def keep_freed_memory():
    """Re-runs this script with MALLOC_ENV set, once (Linux; a no-op once it is set)."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_MAX_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


if __name__ == "__main__":
    keep_freed_memory()

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import common
import calibrate
import data
import dit
import integer
import quant
from diffusion import Diffusion, class_labels, guided, make_noise

DEFAULT_CKPT = dit.DEFAULT_CKPT
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w4a3": (4, 3)}
QAT = "hqdm"  # a trained checkpoint (qat.py --out), never made on the fly
# the best PTQ recipe per setting (docs/results.md: n = 1000), what a QAT default falls back to
BEST_PTQ = {"w8a8": "ditas", "w4a8": "ditas", "w4a4": "svdquant-hadanorm",
            "w4a3": "svdquant-hadanorm"}
# the default per setting: at W4A4 the QAT checkpoint trained from the PTQ one (docs/qat.md:
# n = 1000, CFG 4.0, better FD and recall on seeds 1 and 2); at W4A3 QAT lowered recall, so PTQ
BEST_METHOD = dict(BEST_PTQ, w4a4=QAT)


#################################################################################
#                                   Sampling                                    #
#################################################################################

@torch.no_grad()
def generate(model, labels, steps=50, cfg_scale=4.0, seed=0, sampler="ddim", eta=0.0,
             batch_size=250,
             clip=None, progress=False, noise=None):
    """Samples (N, C, H, W) for `labels`; deterministic for a given seed. Pixel models clip x̂_0 to
    [-1, 1]; latent models (4 channels, official DiT) do not, as the official sample.py."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    model.eval()
    clip = model.in_channels != 4 if clip is None else clip
    device = next(model.parameters()).device
    diffusion = Diffusion.make(steps=steps)
    noise = (make_noise(len(labels), model, seed) if noise is None else noise).to(device)
    labels = labels.to(device)
    out = []
    batches = range(0, len(labels), batch_size)
    for k, i in enumerate(batches):
        g = torch.Generator(device).manual_seed(seed * 1000003 + k)  # DDPM / η>0 noise, per batch
        fn = guided(model, labels[i:i + batch_size], cfg_scale)
        out.append(diffusion.sample(fn, noise[i:i + batch_size], sampler, eta, clip, g,
                                    progress=progress and len(batches) == 1))
    return torch.cat(out).cpu()


#################################################################################
#                              Faster float parts                               #
#################################################################################

def accelerate(model, mode="auto", bf16=False):
    """Makes sampling fast, in place: with bf16 the float parts (embedders, adaLN, norms,
    attention, final layer; all of a full-precision model) in bfloat16, the integer layers keeping
    their GEMM; torch.compile of the DiT block for the integer path ("auto"), or "on" / "off". The
    block is compiled once and its code reused by every block (regional compilation: one graph to
    build, not a whole model's). Returns a note for the report."""
    is_int = any(isinstance(m, integer.IntLinear) for m in model.modules())
    note = []
    if bf16:
        for m in model.modules():
            if not isinstance(m, integer.IntLinear):
                for p in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    if p.is_floating_point():
                        p.data = p.data.bfloat16()
        note.append("bf16 float parts")
    if mode == "off" or (mode == "auto" and not is_int):
        return ", ".join(["eager"] + note)
    if not shutil.which(os.environ.get("CXX") or "g++") and not shutil.which("c++"):
        return ", ".join(["eager (no C++ compiler on PATH for torch.compile)"] + note)
    for blk in model.blocks:
        blk.compile()
    return ", ".join(["compiled"] + note)


@torch.no_grad()
def warm_up(model, labels, cfg_scale, batch_size=250):
    """One forward at the first batch's shape, so that compiling is timed apart from sampling ->
    seconds."""
    t0 = time.time()
    b = min(len(labels), batch_size)
    device = next(model.parameters()).device
    x = make_noise(b, model, 0).to(device)
    guided(model, labels[:b].to(device), cfg_scale)(x, torch.full((b,), 999, device=device))
    return time.time() - t0


#################################################################################
#                                  The grid                                     #
#################################################################################

def save_grid(images, labels, path, names=data.CLASSES, scale=2):
    """Writes a PNG: one row per class (in the order first seen), the class name on the left."""
    imgs = data.to_uint8(images).numpy()  # (N, H, W, C)
    rows = list(dict.fromkeys(labels.tolist()))
    per_row = [[i for i, l in enumerate(labels.tolist()) if l == r] for r in rows]
    ncol = max(len(p) for p in per_row)
    h, w = imgs.shape[1] * scale, imgs.shape[2] * scale
    pad, label_w = 2, 90
    mode = "L" if imgs.shape[-1] == 1 else "RGB"
    canvas = Image.new(mode, (label_w + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad),
                       "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, (cls, idx) in enumerate(zip(rows, per_row)):
        y0 = pad + r * (h + pad)
        draw.text((4, y0 + h // 2 - 6), f"{cls} {names[cls] if cls < len(names) else ''}",
                  fill="black", font=font)
        for c, i in enumerate(idx):
            tile = Image.fromarray(imgs[i][..., 0] if imgs.shape[-1] == 1 else imgs[i])
            tile = tile.resize((w, h), Image.NEAREST).convert(mode)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y0))
    common.save_image(canvas, path)
    return canvas.size


def psnr(a, b):
    """Mean per-image PSNR (dB) of [-1, 1] images, measured on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def save_npz(images, labels, path):
    """ADM / DiT `sample_ddp.py` format: arr_0 uint8 (N, H, W, C), plus our labels."""
    # a file object: savez adds no ".npz"
    with common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=data.to_uint8(images).numpy(), labels=labels.numpy())


#################################################################################
#                                     CLI                                       #
#################################################################################

def parse_classes(text, num_classes):
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise ValueError(f"--classes takes comma-separated class ids, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"unknown class id(s) {bad or text!r}: this model has classes 0..{num_classes - 1}")
    return classes


def method_name(text):
    """--method's type: a recipe calibrate.py knows (mixed precision included), or QAT."""
    if text != QAT:
        try:
            calibrate.parse_method(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}; or {QAT}") from None
    return text


def get_args(argv=None):
    ap = common.Parser(description="Sample a labelled grid of Fashion-MNIST garments from the shipped DiT.")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT,
                    help=f"model checkpoint (default {DEFAULT_CKPT})")
    ap.add_argument("--model", default=None,
                    help="expected config name; an error if the checkpoint is another")
    ap.add_argument("--n", type=common.POSITIVE, default=80,
                    help="number of images, spread evenly over --classes")
    ap.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    ap.add_argument("--steps", type=common.number(int, 1, 1000), default=50, help="sampling steps (respaced from 1000)")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    ap.add_argument("--eta", type=common.number(float, 0, 1), default=0.0,
                    help="DDIM η (0 = deterministic)")
    ap.add_argument("--cfg-scale", type=common.number(float, 0, 100), default=4.0,
                    help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--seed", type=common.number(int, 0), default=0)
    ap.add_argument("--out", default="samples.png", help="PNG grid to write")
    ap.add_argument("--npz", default=None,
                    help="also write raw samples here (arr_0 uint8 NHWC, labels)")
    q = ap.add_mutually_exclusive_group()
    for name, (wb, ab) in SETTINGS.items():
        q.add_argument(f"--{name}", dest="bits", action="store_const", const=name,
                       help=f"{wb}-bit weights, {ab}-bit activations (default recipe: {BEST_METHOD[name]})")
    ap.add_argument("--method", default=None, type=method_name,
                    help=f"PTQ recipe for the bit setting ({', '.join(calibrate.METHODS)}, each optionally +a8[:SHARE]), or {QAT}: the qat.py checkpoint beside --ckpt")
    ap.add_argument("--qckpt", default=None, help="quantized checkpoint to load; default: the cached one beside --ckpt (created by calibrating on the first run)")
    ap.add_argument("--simulate", action="store_true",
                    help="fake-quant float simulation instead of the integer path")
    ap.add_argument("--cfg-delta", choices=["on", "off"], default=None,
                    help="quantized CFG: code the null half's activations as their difference from the conditional half's (default on; off codes each half on its own, as DIT4BIT_CFG_DELTA=off does everywhere)")
    ap.add_argument("--compare-fp", action="store_true",
                    help="also sample the FP model from the same noise; report PSNR")
    ap.add_argument("--image-size", type=common.number(int, 8, 4096), default=None,
                    help="official DiT checkpoint (ImageNet latents): its image size, 256 or 512; needs --vae")
    ap.add_argument("--vae", default=None,
                    help="SD-VAE decoder file (diffusers diffusion_pytorch_model.bin)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the model (auto: on for the integer path where a C++ compiler is present, off for full precision, the plain reference); compile time is reported apart")
    ap.add_argument("--bf16", action="store_true", help="run the float parts (embedders, adaLN, norms, attention, final layer; all of it for full precision) in bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return ap.parse_args(argv)


IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official sample.py's classes


def load_official_model(args):
    """--image-size/--vae: a facebookresearch/DiT checkpoint (ImageNet latents) and the VAE
    decoder."""
    import vae as vae_lib
    if not args.vae:
        raise ValueError("an official DiT samples latents: --vae PATH (sd-vae-ft-mse/-ema decoder) is needed")
    name = args.model or "DiT-XL/2"
    model = dit.load_official(args.ckpt, name, args.image_size or 256)
    decoder = vae_lib.load_vae(args.vae)
    desc = "fp32"
    if args.bits:
        method = args.method or BEST_PTQ[args.bits]  # no QAT file is made for official weights
        t0 = time.time()
        calibrate.quantize_fp(model.to(args.device), method, *SETTINGS[args.bits], calib_n=4,
                              calib_steps=10)
        if not args.simulate:
            integer.to_integer(model)
        desc = f"{args.bits.upper()} {method} {'simulated' if args.simulate else 'integer'} (calibrated in {time.time() - t0:.0f} s)"
    return model, {"model": name}, desc, decoder


def quantized_path(ckpt, setting, method):
    """Where the packed quantized model of `ckpt` is cached: beside it, named by setting and
    recipe."""
    return f"{ckpt[:-3] if ckpt.endswith('.pt') else ckpt}_{setting}_{method.replace(':', '-')}.pt"


def made_from(path, ckpt):
    """Whether the quantized checkpoint `path` records the SHA-256 of the FP file `ckpt` (not
    stale)."""
    try:
        ck = common.load_file(path, "quantized checkpoint")
    # unreadable: not made from anything (a cache is rebuilt, a QAT file refused)
    except ValueError:
        return False
    calib = ck.get("calibration", {}) if isinstance(ck, dict) else {}
    return isinstance(calib, dict) and calib.get("fp_sha256") == common.file_sha256(ckpt)


def load_model(args):
    """-> (model, config, description): FP; a quantized checkpoint (integer path); or FP quantized
    now."""
    if args.method and not args.bits:
        raise ValueError("--method needs a bit setting (--w8a8, --w4a8, --w4a4 or --w4a3)")
    if args.simulate and not args.bits:
        raise ValueError("--simulate needs a bit setting (--w8a8, --w4a8, --w4a4 or --w4a3)")
    if args.qckpt and args.simulate:
        raise ValueError("--simulate calibrates from the FP checkpoint; a packed --qckpt has no float weights or calibration statistics to simulate from")
    if not args.bits and not args.qckpt:
        model, cfg = dit.load_checkpoint(args.ckpt)
        return model, cfg, "fp32"
    method = args.method or default_method(args)
    path = args.qckpt or quantized_path(args.ckpt, args.bits, method)
    stale = False
    # cache made from this FP file?
    if not args.qckpt and os.path.exists(path) and os.path.exists(args.ckpt):
        stale = not made_from(path, args.ckpt)
    if method == QAT and not args.qckpt and (args.simulate or stale or not os.path.exists(path)):
        why = "--simulate needs float weights" if args.simulate else (
            "is unreadable or was trained from another FP file" if stale else "does not exist")
        raise ValueError(f"{path} {why}: QAT checkpoints come from training, e.g. python qat.py train --ckpt {args.ckpt} --wbits {SETTINGS[args.bits][0]} --abits {SETTINGS[args.bits][1]} --out {path}")
    if not args.simulate and os.path.exists(path) and stale and not args.qckpt:
        print(f"warning: {path} is unreadable or was made from another FP file; calibrating it anew",
              file=sys.stderr)
    if not args.simulate and os.path.exists(path) and not stale:
        return load_saved(path, method, args)
    if args.qckpt:
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    return calibrate_now(args, method, path)


def default_method(args):
    """The bit setting's default; a QAT default falls back to the best PTQ recipe (and says so)
    where its trained file cannot serve: --simulate, or no file made from --ckpt beside it."""
    if not args.bits:
        return None
    best = BEST_METHOD[args.bits]
    if best == QAT and not args.qckpt:
        path = quantized_path(args.ckpt, args.bits, QAT)
        why = ("--simulate needs float weights" if args.simulate else
               f"no {path} made from {args.ckpt}" if not (os.path.exists(path) and made_from(path, args.ckpt))
               else None)
        if why:
            print(f"note: {why}; using the best PTQ recipe, {BEST_PTQ[args.bits]}", file=sys.stderr)
            return BEST_PTQ[args.bits]
    return best


def load_saved(path, method, args):
    """A quantized checkpoint -> (model, config, description); it must hold `method` at the
    asked bit setting (a --qckpt given without --method: any recipe of those bits)."""
    model, cfg, recipe = integer.load_quantized(path)
    same = (recipe.method == method or (method == QAT and recipe.method.startswith(QAT + "-"))
            or (args.qckpt and not args.method))
    bits = f"W{recipe.wq.bits}A{recipe.aq.bits}"
    if args.bits and (not same or (recipe.wq.bits, recipe.aq.bits) != SETTINGS[args.bits]):
        raise ValueError(f"{path} holds {recipe.method} {bits}, not {method} {args.bits.upper()}")
    path_kind = "integer" if recipe.integer else "simulated"
    return model, cfg, f"{bits} {recipe.method} {path_kind} (loaded {path})"


def calibrate_now(args, method, path):
    """Quantizes the FP checkpoint by `method` -> (model, config, description); on the integer
    path it is saved to `path`, the cache later runs load, and sampled from its saved form."""
    model, cfg = dit.load_checkpoint(args.ckpt)
    t0 = time.time()
    recipe, _ = calibrate.quantize_fp(model, method, *SETTINGS[args.bits])
    made = f"{args.bits.upper()} {method} %s (calibrated in {time.time() - t0:.1f} s%s)"
    if args.simulate:
        return model, cfg, made % ("simulated", "")
    integer.to_integer(model)
    try:  # only a cache: a file that cannot be written does not stop sampling
        common.check_output(path, (args.ckpt,), "the calibration cache")
        integer.save_quantized(path, model, cfg, recipe,
                                 {"ckpt": args.ckpt, "fp_sha256": common.file_sha256(args.ckpt)})
    except (OSError, ValueError) as e:
        print(f"warning: calibrated model not cached ({e}); sampling from it all the same",
              file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:  # the saved form all the same
            integer.save_quantized(os.path.join(tmp, "q.pt"), model, cfg, recipe, {})
            return integer.load_quantized(os.path.join(tmp, "q.pt"))[0], cfg, \
                made % ("integer", ", not cached")
    # important! sample from what was saved (fp16 adaLN), as every later run
    return integer.load_quantized(path)[0], cfg, made % ("integer", f", saved {path}")


def main(argv=None):
    args = get_args(argv)
    inputs = (args.ckpt, args.qckpt, args.vae)
    common.check_output(args.out, inputs, "--out")
    common.check_output(args.npz, inputs + (args.out,), "--npz")
    common.check_device(args.device)
    t0 = time.time()
    decoder = None
    if args.image_size or args.vae:
        model, cfg, desc, decoder = load_official_model(args)
    else:
        model, cfg, desc = load_model(args)
    if args.model and args.model != cfg["model"]:
        raise ValueError(f"{args.ckpt} holds a {cfg['model']} model, not {args.model}")
    model.to(args.device)
    if args.cfg_delta:
        quant.set_cfg_delta(model, args.cfg_delta == "on")
    default = IMAGENET_CLASSES if decoder is not None else list(range(model.num_classes))
    classes = parse_classes(args.classes, model.num_classes) if args.classes else default
    labels = class_labels(args.n, classes)
    how = accelerate(model, args.compile, args.bf16)
    if how.startswith("compiled"):
        how = how.replace("compiled", f"compiled in {warm_up(model, labels, args.cfg_scale):.1f} s",
                          1)
    t1 = time.time()
    images = generate(model, labels, args.steps, args.cfg_scale, args.seed, args.sampler, args.eta,
                      progress=True)
    if decoder is not None:  # latents -> pixels
        decoder.to(args.device)
        images = torch.cat([decoder.decode(z[None].to(args.device)).cpu() for z in images])
    t2 = time.time()
    if not torch.isfinite(images).all():
        raise ValueError(f"sampling produced NaN or Inf ({desc}); nothing written")
    cmp = ""
    if args.compare_fp:
        fp, _ = dit.load_checkpoint(args.ckpt)
        ref = generate(fp, labels, args.steps, args.cfg_scale, args.seed, args.sampler, args.eta)
        cmp = f" | PSNR vs FP {psnr(images, ref):.2f} dB"
    size = save_grid(images, labels, args.out, names=data.CLASSES if decoder is None else [])
    if args.npz:
        save_npz(images, labels, args.npz)
    print(f"{args.out}: {args.n} images ({size[0]}x{size[1]} grid) from {cfg['model']} {desc} | {args.sampler} {args.steps} steps, cfg {args.cfg_scale}, seed {args.seed} | sampling {t2 - t1:.1f} s ({how}), total {time.time() - t0:.1f} s" + cmp + (f" | npz {args.npz}" if args.npz else ""))


if __name__ == "__main__":
    common.run_cli(main)
