"""HQ-DM: quantization-aware training with a single Hadamard transform, distilled data-free.

The quantized model computes y = [Q_a(x Hᵀ) H] Q_w(W)ᵀ in every qkv/proj/fc1/fc2: activations are
quantized in one Hadamard domain and rotated back, weights are quantized unrotated (per channel), so
the integer form Q_a(x Hᵀ) · (W_int H_rawᵀ) needs no rotated float weight (see QuantLinear.single).
Step sizes are learned (LSQ: the straight-through estimator makes d/ds [round(x/s) s] = round(x/s) −
x/s), weights per output channel; activations per token, step = r_b · max|x̃_token| / qmax with one
learned clipping ratio r_b per timestep bucket (or --act static: one learned step per bucket); the
weights are fine-tuned too. The start is the PTQ HadaNorm recipe (mean-centering and channel scale
before H), because its loss over the first 50 steps measured 2.7x lower than plain static steps'
(3.43e-2 against 1.26e-2, docs/qat.md). The loss is the MSE between the FP and quantized ε predictions (conditional and null-class
halves) along the FP model's own DDIM trajectories with CFG: no data set is needed.

    python qat.py train --wbits 4 --abits 4 --out runs/qat_w4a4.pt     # the default steps
    python qat.py train ... --hadamard none | double                    # the ablation: plain LSQ QAT / QuaRot-style
    python qat.py score runs/qat_w4a4.pt                                # held-out distillation loss
"""
import copy
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import calibrate
import dit
import integer
from diffusion import Diffusion, class_labels, make_noise
from quant import QConfig, QuantLinear, Recipe

MODES = ("single", "none", "double")  # quant.HADAMARD
INITS = ("hadanorm", "svdquant-hadanorm")  # PTQ recipes QAT can start from (or "plain")
ACTS = ("token", "static")


#################################################################################
#                               Model preparation                               #
#################################################################################

def prepare(fp, wbits, abits, mode="single", block=None, buckets=10, calib_n=8, calib_steps=25,
            seed=0,
            init="hadanorm", act="token"):
    """FP model -> QAT model (a copy): QuantLinears with learnable steps, initialised by
    calibration.

    init: a PTQ recipe of calibrate.py to start from, in the chosen Hadamard form: "hadanorm"
    (dynamic mean-centering, channel scale s folded into W), "svdquant-hadanorm" (the same plus a
    float rank-32 branch of the weight, trained too), either + "+a8" (its most sensitive layers at
    8-bit activations); or "plain": no centering or scale. act "token" is per-token dynamic with a
    learned clipping ratio per timestep bucket (step 0 = the PTQ recipe's min-max); "static" is one
    learned step per timestep
    bucket and tensor, calibrated from max|x̃|."""
    if mode not in MODES:
        raise ValueError(f"unknown --hadamard {mode!r}; choose one of {', '.join(MODES)}")
    if (init != "plain" and calibrate.parse_method(init)[0] not in INITS) or act not in ACTS:
        raise ValueError(f"--init is plain or one of {', '.join(INITS)} (each optionally +a8), and --act one of {', '.join(ACTS)}")
    for b in (wbits, abits):
        if not 3 <= b <= 8:
            raise ValueError(f"unsupported bit width {b} for QAT: choose 3..8")
    model = copy.deepcopy(fp)
    aq = (QConfig(abits, clip=True, buckets=buckets) if act == "token"
          else QConfig(abits, granularity="tensor", dynamic=False, buckets=buckets))
    recipe = Recipe(f"hqdm-{mode}", QConfig(wbits, range="mse"), aq, hadamard=mode, block=block,
                    init=init)
    # important! W4A4 loss over the first 50 steps 1.26e-2 from HadaNorm, vs 3.43e-2 plain/static
    if init != "plain":
        stats = calibrate.collect_stats(fp, calib_n, calib_steps, seed=seed)
        ptq = calibrate.build_recipe(fp, stats, init, wbits, abits, block=block)
        recipe = dataclasses.replace(recipe, center=ptq.center, scales=ptq.scales,
                                     lowrank=ptq.lowrank, layer_abits=ptq.layer_abits)
    # quantize_model, and the low-rank branch if the recipe has one
    calibrate.apply_recipe(model, recipe)
    if act == "static":
        # activation steps from max|x̃|
        calibrate.calibrate_static(model, calib_n, calib_steps, seed=seed)
    make_learnable(model)
    return model, recipe


def make_learnable(model):
    """Weights (and a low-rank branch), weight steps and activation steps of every QuantLinear
    become trainable Parameters; everything else stays frozen."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for name in ("w_scale", "a_scale", "a_clip"):
                t = getattr(m, name)
                if t is not None and not isinstance(t, nn.Parameter):
                    delattr(m, name)  # a buffer until now
                    setattr(m, name, nn.Parameter(t.detach().clone()))
    for p in model.parameters():  # everything else (embedders, adaLN, final layer) stays frozen
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for p in steps_of(m, weight=True):
                p.requires_grad_(True)
    return model


#################################################################################
#                         Distillation targets (no data)                        #
#################################################################################

@torch.no_grad()
def trajectories(fp, n=64, steps=25, cfg_scale=4.0, seed=0):
    """Runs the FP model's DDIM with CFG from fixed noise and records every step's state and both
    of its predictions: (x_t, t, y, ε_cond, ε_null, s), each (n·steps, ...), one row per trajectory
    and step.
    cfg_scale may be a tuple: trajectory i is guided with cfg_scale[i % len] (s records which)."""
    d = Diffusion.make(steps=steps)
    dev = next(fp.parameters()).device
    y = class_labels(n, list(range(fp.num_classes))).to(dev)
    null = torch.full_like(y, fp.num_classes)
    x = make_noise(n, fp, seed).to(dev)
    scales = torch.tensor(cfg_scale if isinstance(cfg_scale, (tuple, list)) else [cfg_scale],
                          dtype=x.dtype)
    s = scales[torch.arange(n) % len(scales)].to(dev)  # (n,) guidance of each trajectory
    X, T, EC, EU = [], [], [], []
    for i in tqdm(range(steps)[::-1], desc="FP trajectories", leave=False, disable=None):
        t = torch.full((n,), int(d.timestep_map[i]), dtype=torch.long, device=dev)
        out = fp(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2n, C, H, W)
        cond, unc = out[:n], out[n:]
        X.append(x), T.append(t), EC.append(cond), EU.append(unc)
        guided_eps = unc + s.view(-1, 1, 1, 1) * (cond - unc)
        x = d.ddim_step(lambda *_: guided_eps, x, i, clip=fp.in_channels != 4)
    k = len(X)
    return torch.cat(X), torch.cat(T), y.repeat(k), torch.cat(EC), torch.cat(EU), s.repeat(k)


LOSSES = ("guided", "branch")


def distill_loss(model, batch, loss="guided"):
    """The quantized model's ε against the FP model's on a batch of trajectory states, both halves
    of CFG run as one batch. "guided": the error of what the sampler uses, ε_null + s (ε_cond −
    ε_null), at each
    trajectory's own scale; "branch": the error of each half alone."""
    x, t, y, ec, eu, s = batch
    # (DDP wraps the model in .module)
    null = torch.full_like(y, getattr(model, "module", model).num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, unc = out.chunk(2)
    if loss == "branch":
        return F.mse_loss(out, torch.cat([ec, eu]))
    s = s.view(-1, 1, 1, 1)
    return F.mse_loss(unc + s * (cond - unc), eu + s * (ec - eu))


@torch.no_grad()
def score(model, data, chunk=100, loss="guided"):
    """distill_loss over all targets, in chunks (no gradients): how close a model is to the FP
    one."""
    n = len(data[0])
    return sum(distill_loss(model, [d[i:i + chunk] for d in data], loss).item() * min(chunk, n - i)
               for i in range(0, n, chunk)) / n


#################################################################################
#                                   Training                                    #
#################################################################################

def get_args(argv=None):
    ap = common.Parser(description="HQ-DM quantization-aware training of the DiT (data-free distillation).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    shared = common.Parser(add_help=False)
    shared.add_argument("--ckpt", default=dit.DEFAULT_CKPT,
                        help="FP checkpoint (teacher and initialisation)")
    shared.add_argument("--traj", type=int, default=64,
                        help="FP trajectories for the distillation targets")
    shared.add_argument("--steps", type=int, default=25, help="DDIM steps of each trajectory")
    shared.add_argument("--traj-cfg", default="4.0", help="CFG scale(s) of the FP trajectories, comma-separated: trajectories alternate between them (e.g. 1.5,4.0: the metrics' and the pictures' scale)")
    shared.add_argument("--loss", default="guided", choices=LOSSES, help="distil the guided ε the sampler uses, at each trajectory's CFG scale, or each half (conditional, null) alone")
    shared.add_argument("--seed", type=common.number(int, 0), default=0, help="seed of the trajectories (and of training)")
    shared.add_argument("--device", default="cpu", help="cpu or cuda")
    t = sub.add_parser("train", parents=[shared],
                       help="train (or resume) and export a packed integer checkpoint")
    t.add_argument("--wbits", type=int, default=4)
    t.add_argument("--abits", type=int, default=4)
    t.add_argument("--hadamard", default="single", choices=MODES, help="single: HQ-DM (weights unrotated); double: QuaRot-style (weights rotated too; the integer form is as fast as HadaNorm's); none")
    t.add_argument("--block", type=int, default=None,
                   help="Hadamard block size (default: full width)")
    t.add_argument("--init", default="hadanorm",
                   help=f"the PTQ recipe to start from: plain or one of {', '.join(INITS)}, optionally +a8")
    t.add_argument("--act", default="token", choices=ACTS, help="activations: per token with a learned clip ratio per bucket, or one learned static step per bucket")
    t.add_argument("--buckets", type=common.POSITIVE, default=10, help="timestep buckets of activation steps / clip ratios")
    t.add_argument("--iters", type=common.POSITIVE, default=300, help="optimizer steps")
    t.add_argument("--batch-size", type=common.POSITIVE, default=32, help="trajectory states per step (each runs both CFG halves)")
    t.add_argument("--lr", type=common.number(float, above=0), default=3e-4, help="weights (3e-4 beat 1e-4 and 1e-5 over 120 steps)")
    t.add_argument("--lr-scale", type=common.number(float, above=0), default=1e-3,
                   help="step sizes")
    t.add_argument("--state-dir", default="runs/qat", help="folder of the resumable state")
    t.add_argument("--out", default=None,
                   help="write the packed integer checkpoint here at the end")
    t.add_argument("--snapshot-every", type=common.number(int, 0), default=0, help="also export OUT_iterN.pt every N steps, to pick the best by a sample metric afterwards (evaluate.py table --qckpt ...)")
    t.add_argument("--ckpt-every", type=common.POSITIVE, default=200,
                   help="steps between resumable states")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    t.add_argument("--minutes", type=common.number(float, above=0), default=None,
                   help="time budget: stop (and save) after this long")
    sc = sub.add_parser("score", parents=[shared], help="the distillation loss of saved quantized checkpoints on the trajectories of --traj/--steps/--traj-cfg/--seed (another seed than training's: held out)")
    sc.add_argument("qckpt", nargs="+")
    args = ap.parse_args(argv)
    if args.traj < 1 or args.steps < 1 or (args.cmd == "train" and (args.iters < 1 or args.batch_size < 1)):
        raise ValueError("--traj, --steps, --iters and --batch-size must be positive")
    try:
        args.traj_cfg = tuple(float(v) for v in args.traj_cfg.split(","))
    except ValueError:
        raise ValueError(f"--traj-cfg wants comma-separated numbers, got {args.traj_cfg!r}") from None
    if not all(math.isfinite(c) and 0 <= c <= 100 for c in args.traj_cfg):
        raise ValueError(f"--traj-cfg: CFG scales must be finite, in [0, 100]; got {args.traj_cfg}")
    if args.cmd == "train":
        common.check_output(args.out, (args.ckpt,), "--out", args.force)
        if os.path.exists(args.state_dir) and not os.path.isdir(args.state_dir):
            raise ValueError(f"--state-dir {args.state_dir} is a file, not a folder")
    return args


def identity(args):
    """What a resumed run must agree on."""
    return {k: getattr(args, k) for k in ("ckpt", "wbits", "abits", "hadamard", "block", "buckets",
                                          "batch_size", "init",
                                         "act", "traj", "steps", "traj_cfg", "loss", "seed")}


def resume(args, state_path, model, opt, gen):
    """Loads a QAT run's state into model, opt and gen -> its step; refuses other settings."""
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"--resume: no QAT state at {state_path}")
    st = common.load_file(state_path, "QAT state")
    if st["identity"] != identity(args):
        diff = {k: (st["identity"].get(k), v) for k, v in identity(args).items()
                if st["identity"].get(k) != v}
        raise ValueError(f"--resume: {state_path} was trained with other settings (saved, now): {diff}")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    gen.set_state(st["gen"])
    return st["step"]


def train(args):
    """Runs (or resumes) QAT; returns (model, recipe, cfg, losses of this call). Under torchrun the
    global batch (one generator) is split over the processes, as in train.py."""
    rank, world, device = common.setup_distributed(args.device, args.batch_size)
    fp, cfg = dit.load_checkpoint(args.ckpt)
    fp = fp.to(device).requires_grad_(False)
    os.makedirs(args.state_dir, exist_ok=True)
    state_path = os.path.join(args.state_dir, "state.pt")
    torch.manual_seed(args.seed)
    model, recipe = prepare(fp, args.wbits, args.abits, args.hadamard, args.block, args.buckets,
                            seed=args.seed,
                            init=args.init, act=args.act)
    # deterministic: rebuilt on resume
    data = trajectories(fp, args.traj, args.steps, args.traj_cfg, seed=args.seed)
    opt = make_optimizer(model, args.lr, args.lr_scale)
    gen = torch.Generator().manual_seed(args.seed)
    step = resume(args, state_path, model, opt, gen) if args.resume else 0

    def save():
        if rank == 0:
            common.atomic_save({"model": model.state_dict(), "opt": opt.state_dict(),
                                "gen": gen.get_state(),
                                "step": step, "identity": identity(args)}, state_path)
        if world > 1:
            dist.barrier()

    losses, t0 = [], time.time()
    bar = tqdm(total=args.iters, initial=step, desc=f"QAT W{args.wbits}A{args.abits} {args.hadamard}",
               disable=None if rank == 0 else True)
    model.eval()  # important! train() would switch on the label embedder's class dropout
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    b = args.batch_size // world
    while step < args.iters:
        idx = torch.randint(0, len(data[0]), (args.batch_size,), generator=gen)[rank * b:(rank + 1) * b].to(device)
        loss = distill_loss(net, [d[idx] for d in data], args.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the processes = the global batch's mean
        opt.step()
        step += 1
        lv = loss.detach()
        if world > 1:
            dist.all_reduce(lv)
            lv = lv / world
        losses.append(lv.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3e}")
        if step % args.ckpt_every == 0 or step == args.iters:
            save()
        if args.snapshot_every and step % args.snapshot_every == 0 and rank == 0 and args.out:
            export(model, recipe, cfg, snapshot_path(args.out, step), calibration(args))
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            save()
            break
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return model, recipe, cfg, losses


@torch.no_grad()
def export(model, recipe, cfg, path, calib):
    """Packs the trained model (learned steps kept) for the integer path and saves it; loadable by
    `sample.py --qckpt` and `integer.load_quantized`."""
    model = copy.deepcopy(model).requires_grad_(False)
    integer.to_integer(model)
    integer.save_quantized(path, model, cfg, recipe, calib)
    return model


def weights_of(q):
    """A QuantLinear's trained weights: W̃ and, where the recipe has one, its float low-rank
    branch."""
    return [p for p in (q.weight, q.lora_u, q.lora_v) if p is not None]


def steps_of(q, weight=False):
    """A QuantLinear's learnable step sizes (weight steps, then activation steps or clip ratios),
    after its weights if `weight`."""
    return (weights_of(q) if weight else []) + [p for p in (q.w_scale, q.a_scale, q.a_clip) if p is not None]


def make_optimizer(model, lr, lr_scale):
    """AdamW over the QuantLinears: weights at lr, step sizes and clip ratios (LSQ) at lr_scale."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return torch.optim.AdamW([{"params": [p for q in qs for p in weights_of(q)], "lr": lr},
                              {"params": [p for q in qs for p in steps_of(q)], "lr": lr_scale}],
                             weight_decay=0)


def lesson(steps=30, n=8, traj_steps=10):
    """`python qat.py` with no arguments: a few distillation steps at W4A4, the loss going down."""
    t0 = time.time()
    fp = dit.load_checkpoint(dit.DEFAULT_CKPT)[0].requires_grad_(False)
    torch.manual_seed(0)
    model, _ = prepare(fp, 4, 4, "single", calib_n=n, calib_steps=traj_steps)
    # n·traj_steps states (x_t, t, y) with both FP predictions
    data = trajectories(fp, n, traj_steps)
    opt, gen = make_optimizer(model, 1e-4, 1e-3), torch.Generator().manual_seed(0)
    model.eval()  # important! no label dropout
    print(f"HQ-DM W4A4 (single Hadamard) distilled from {dit.DEFAULT_CKPT}'s own CFG 4.0 trajectories ({n} images x {traj_steps} DDIM steps = {len(data[0])} states), batch 16:")
    for step in range(steps + 1):
        if step % 5 == 0:
            with torch.no_grad():
                print(f"  step {step:3d}  MSE of the guided ε on all states {distill_loss(model, data).item():.3e}")
        if step < steps:
            idx = torch.randint(0, len(data[0]), (16,), generator=gen)
            loss = distill_loss(model, [d[idx] for d in data])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    print(f"{steps} steps in {time.time() - t0:.0f} s; a real run: python qat.py train --wbits 4 --abits 4 --out ...   (see docs/qat.md)")


def snapshot_path(out, step):
    return f"{out[:-3] if out.endswith('.pt') else out}_iter{step}.pt"


def calibration(args):
    """What a QAT checkpoint records of its making: the run's settings and the FP file's SHA-256."""
    return dict({k: v for k, v in vars(args).items() if v is not None},
                fp_sha256=common.file_sha256(args.ckpt))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return lesson()
    args = get_args(argv)
    t0 = time.time()
    if args.cmd == "score":
        fp = dit.load_checkpoint(args.ckpt)[0].requires_grad_(False)
        data = trajectories(fp, args.traj, args.steps, args.traj_cfg, seed=args.seed)
        for path in args.qckpt:
            print(f"{path}: MSE(ε_q, ε_fp) {score(integer.load_quantized(path)[0], data, loss=args.loss):.3e} ({args.loss}) on {args.traj} trajectories x {args.steps} steps (seed {args.seed}, CFG {'/'.join(map(str, args.traj_cfg))})")
        return
    model, recipe, cfg, losses = train(args)
    msg = f"QAT {recipe.method} W{args.wbits}A{args.abits}: {len(losses)} steps in {time.time() - t0:.0f} s"
    if losses:
        k = min(50, len(losses))
        msg += f", loss {sum(losses[:k]) / k:.3e} (first {k}) -> {sum(losses[-k:]) / k:.3e} (last {k})"
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if args.out:
        export(model, recipe, cfg, args.out, calibration(args))
        msg += f"; saved {args.out}"
    print(msg)


if __name__ == "__main__":
    common.run_cli(main)
