"""Quantization-aware training (HQ-DM's form and QuaRot's), distilled from the FP model.

The quantized model computes y = [Q_a(x Hᵀ) H] Q_w(W)ᵀ (single: HQ-DM, weights unrotated) or
Q_a(x Hᵀ) Q_w(W Hᵀ)ᵀ (double) in every qkv/proj/fc1/fc2, after PTQ's centring and channel scale.
Step sizes are learned (LSQ: d/ds [round(x/s) s] = round(x/s) − x/s), weights per output channel,
activations per token with one learned clipping ratio per timestep bucket.
- states (--states): the FP model's own DDIM states at CFG 4.0 (a pool of trajectories on the
  sampler's grid), or Fashion-MNIST training images noised at a uniform t in 1..999 with fresh
  noise every step and 10% null labels (QVGen's way); t = 0 never. The FP model's ε is the target
  of both CFG halves (conditional and null), run as the sampler runs them: one batch, the null
  half coded as its difference from the conditional one (dit.cfg_pairs; DIT4BIT_CFG_DELTA=off: each
  half on its own);
- loss: each half's error plus (s − 1)² times the error of their difference, so the guided output
  ε_u + s(ε_c − ε_u) the sampler uses is matched without losing the halves' cancellation; each
  timestep band weighted by 1 / (the start's error there), so no t dominates;
- what learns: the activation clip ratios from the start; the weight steps only with --lr-wstep;
  weights (and an SVDQuant branch) only from --weights-from on, at a small rate decaying to 0, with
  gradient clipping and an EMA of every trained tensor (the EMA is what is exported).
Step 0 is the PTQ recipe as calibrate.py makes it (same calibration), so the start is the shipped
PTQ model. Choose snapshots by samples (evaluate.py screen), never by this loss: what paid here
was 100 steps of clip ratios on the FP trajectories (docs/qat.md).

    python qat.py @config/qat_w4a4_traj.args     # a real run (train; resumable, snapshots)
    python qat.py score --t0 runs/qat/w4a4_traj_iter100.pt checkpoints/dit_t4_w4a4_svdquant-hadanorm.pt
    python qat.py                                # the lesson: a few steps, the per-band error going down
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
from tqdm import tqdm

import common
import calibrate
import data
import dit
import integer
import quant
from diffusion import Diffusion, sample_states
from quant import QConfig, QuantLinear, Recipe

MODES = ("single", "none", "double")  # quant.HADAMARD
INITS = ("hadanorm", "svdquant-hadanorm")  # PTQ recipes QAT can start from (or "plain")
ACTS = ("token", "static")


#################################################################################
#                               Model preparation                               #
#################################################################################

def prepare(fp, wbits, abits, mode="single", block=None, buckets=10, calib_n=16, calib_steps=25,
            seed=1234, init="hadanorm", act="token", init_alpha=0.5, init_lowrank_iters=1):
    """FP model -> QAT model (a copy): QuantLinears with learnable steps, initialised by
    calibration.

    init: a PTQ recipe of calibrate.py to start from, in the chosen Hadamard form: "hadanorm"
    (dynamic mean-centering, channel scale s folded into W), "svdquant-hadanorm" (the same plus a
    float rank-32 branch of the weight, trained too), either + "+a8" (its most sensitive layers at
    8-bit activations); or "plain": no centering or scale. act "token" is per-token dynamic with a
    learned clipping ratio per timestep bucket (step 0 = the PTQ recipe's min-max); "static" is one
    learned step per timestep
    bucket and tensor, calibrated from max|x̃|. init_alpha and init_lowrank_iters are the PTQ
    recipe's smoothing exponent ("search": per layer) and branch refinement rounds (`calibrate.py
    --alpha`, `--lowrank-iters`). The calibration defaults are calibrate.py's, so in
    the double form step 0 is the PTQ model calibrate.py ships."""
    if mode not in MODES:
        raise ValueError(f"unknown --hadamard {mode!r}; choose one of {', '.join(MODES)}")
    if (init != "plain" and calibrate.parse_method(init)[0] not in INITS) or act not in ACTS:
        raise ValueError(f"--init is plain or one of {', '.join(INITS)} (each optionally +a8), and --act one of {', '.join(ACTS)}")
    if act == "static" and init_lowrank_iters > 1:  # the refinement scores with dynamic activations
        raise ValueError("--init-lowrank-iters > 1 needs --act token")
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
        ptq = calibrate.build_recipe(fp, stats, init, wbits, abits, block=block, alpha=init_alpha,
                                     lowrank_iters=init_lowrank_iters)
        recipe = dataclasses.replace(recipe, center=ptq.center, scales=ptq.scales, alpha=ptq.alpha,
                                     alphas=ptq.alphas, lowrank=ptq.lowrank,
                                     lowrank_iters=ptq.lowrank_iters, layer_abits=ptq.layer_abits)
    # quantize_model, and the low-rank branch if the recipe has one (refined on the calibration
    # inputs, with every clip ratio still 1: per-token min-max, as in calibrate.py)
    calibrate.apply_recipe(model, recipe, stats if init != "plain" else None)
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
#                   Targets: real images noised at a random t                   #
#################################################################################

BAND = 100  # timesteps per band: of the loss weights and of the held-out metric
T_MIN = 1  # t = 0 is never trained on nor scored: ε is 1% of x_t there, and the sampler uses 1% of it


def noised_batch(x0, y, gen, diffusion, num_classes, null_p=0.1):
    """Real images -> a training batch (x_t, t, y): x_t = q_sample(x0, t, ε) at a uniform t in
    1..999 with fresh noise, a share null_p of the labels turned into the null class."""
    n = len(x0)
    t = torch.randint(T_MIN, diffusion.num_timesteps, (n,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(n, generator=gen) < null_p
    return diffusion.q_sample(x0, t, noise), t, torch.where(drop, num_classes, y)


@torch.no_grad()
def trajectory_pool(fp, n, steps=50, cfg_scale=4.0, seed=0):
    """The states (x_t, t, y) the sampler feeds the model: n FP DDIM trajectories at cfg_scale on
    the sampler's own grid, every class alike, t = 0 out -> (x, t, y) of n · (steps − 1) states."""
    states = [s for s in sample_states(fp, n, steps, cfg_scale, seed) if bool((s[1] > 0).all())]
    return tuple(torch.cat(v) for v in zip(*states))


def both_halves(model, x, t, y):
    """(ε_cond, ε_null): both CFG halves, run as one batch as the sampler runs them (a CFG pair:
    quantized layers code the null half against the conditional one, dit.cfg_pairs)."""
    null = torch.full_like(y, getattr(model, "module", model).num_classes)  # DDP wraps in .module
    with dit.cfg_pairs(model):
        return model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)


def per_sample_error(qc, qu, ec, eu, diff_weight):
    """|e_c|² + |e_u|² + λ |e_c − e_u|² of each sample (means over pixels), e each half's error.
    The guided error is e_c + (s − 1)(e_c − e_u): λ = (s − 1)² weighs the difference as the
    sampler does, and the halves' own terms keep guidance's cancellation (a loss on the guided
    output alone cannot see errors with s e_c = (s − 1) e_u)."""
    dc, du = qc - ec, qu - eu
    mse = lambda e: e.pow(2).flatten(1).mean(1)
    return mse(dc) + mse(du) + diff_weight * mse(dc - du)  # (N,)


def qat_loss(model, fp, batch, band_w, diff_weight):
    """The batch's error against the FP teacher, each sample weighted by its timestep band."""
    x, t, y = batch
    with torch.no_grad():
        ec, eu = both_halves(fp, x, t, y)
    qc, qu = both_halves(model, x, t, y)
    return (band_w[t // BAND] * per_sample_error(qc, qu, ec, eu, diff_weight)).mean()


#################################################################################
#                   Held-out metric: the error per timestep band                #
#################################################################################

@torch.no_grad()
def held_out(fp, n=40, seed=7, data_dir=None, at_t0=False):
    """Fixed held-out states from the test split: n images, each at the centre of every band
    (t = 50, 150, ..., 950), fixed noise, with the FP model's ε of both halves. at_t0: the same
    images at t = 0 alone (the diagnosis: what t = 0 weighed in the old loss)."""
    x0, y = data.load("test", data_dir)
    g, diffusion = torch.Generator().manual_seed(seed), Diffusion.make()
    idx = torch.randperm(len(x0), generator=g)[:n]
    bands = 1 if at_t0 else diffusion.num_timesteps // BAND
    x0, y = x0[idx].repeat_interleave(bands, 0), y[idx].repeat_interleave(bands)  # (n·bands, ...)
    t = (torch.arange(bands) * BAND + (0 if at_t0 else BAND // 2)).repeat(len(idx))
    x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ec, eu = zip(*(both_halves(fp, x[i:i + 200], t[i:i + 200], y[i:i + 200])
                   for i in range(0, len(x), 200)))
    return x, t, y, torch.cat(ec), torch.cat(eu)


@torch.no_grad()
def band_errors(model, ho, cfg_scale=4.0):
    """-> (guided ε MSE, the loss's error) per band, each (bands,): the guided one is what the
    sampler uses at cfg_scale."""
    x, t, y, ec, eu = ho
    g, obj = [], []
    for i in range(0, len(x), 200):
        qc, qu = both_halves(model, x[i:i + 200], t[i:i + 200], y[i:i + 200])
        dc, du = qc - ec[i:i + 200], qu - eu[i:i + 200]
        g.append((du + cfg_scale * (dc - du)).pow(2).flatten(1).mean(1))
        obj.append(per_sample_error(qc, qu, ec[i:i + 200], eu[i:i + 200], (cfg_scale - 1) ** 2))
    b = t // BAND
    per_band = lambda v: torch.zeros(int(b.max()) + 1).index_add_(0, b, torch.cat(v)) / torch.bincount(b)
    return per_band(g), per_band(obj)


GROUPS = ((0, 1), (1, 3), (3, 6), (6, 10))  # bands -> t in [1, 100), [100, 300), [300, 600), [600, 1000)


def band_report(guided, start=None):
    """One line: the guided ε MSE of each group of bands, and the mean over bands of each band's
    error relative to `start`'s (1 = no change)."""
    parts = [f"t {100 * a or 1}-{100 * b - 1}: {guided[a:b].mean():.2e}" for a, b in GROUPS]
    if start is not None:
        parts.append(f"relative to start {(guided / start).mean():.3f}")
    return ", ".join(parts)


#################################################################################
#                                   Training                                    #
#################################################################################

def get_args(argv=None):
    ap = common.Parser(description="Quantization-aware training of the DiT, distilled from the FP model on noised Fashion-MNIST images.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    shared = common.Parser(add_help=False)
    shared.add_argument("--ckpt", default=dit.DEFAULT_CKPT, help="FP checkpoint (teacher and initialisation)")
    shared.add_argument("--data-dir", default=None, help=f"Fashion-MNIST's gz IDX files (default {data.DATA_DIR})")
    shared.add_argument("--cfg", type=common.number(float, 1, 100), default=4.0, help="the CFG scale s the loss and the metric weigh the halves' difference for")
    shared.add_argument("--eval-n", type=common.POSITIVE, default=40, help="held-out test images of the per-band metric (each at 10 timesteps)")
    shared.add_argument("--eval-seed", type=common.number(int, 0), default=7, help="seed of the held-out images and noise")
    shared.add_argument("--device", default="cpu", help="cpu or cuda")
    t = sub.add_parser("train", parents=[shared], help="train (or resume) and export a packed integer checkpoint")
    t.add_argument("--wbits", type=int, default=4)
    t.add_argument("--abits", type=int, default=4)
    t.add_argument("--hadamard", default="single", choices=MODES, help="single: HQ-DM (weights unrotated); double: QuaRot-style (W rotated; as fast as HadaNorm); none")
    t.add_argument("--block", type=int, default=None, help="Hadamard block size (default: full width)")
    t.add_argument("--init", default="svdquant-hadanorm", help=f"the PTQ recipe to start from: plain or one of {', '.join(INITS)}, optionally +a8")
    t.add_argument("--init-alpha", type=calibrate.alpha_arg, default=0.5, help="the PTQ start's smoothing exponent, or 'search' (calibrate.py --alpha)")
    t.add_argument("--init-lowrank-iters", type=common.POSITIVE, default=1, help="the PTQ start's branch refinement rounds (calibrate.py --lowrank-iters)")
    t.add_argument("--act", default="token", choices=ACTS, help="activations: per token with a learned clip ratio per bucket, or one learned static step per bucket")
    t.add_argument("--buckets", type=common.POSITIVE, default=10, help="timestep buckets of activation steps / clip ratios")
    t.add_argument("--iters", type=common.POSITIVE, default=1200, help="optimizer steps of the whole run (the rates' cosine spans them)")
    t.add_argument("--weights-from", type=common.number(int, 0), default=None, help="step from which weights and branch train too (default: never; steps and clip ratios only)")
    t.add_argument("--batch-size", type=common.POSITIVE, default=32, help="images per step (each runs both CFG halves)")
    t.add_argument("--lr", type=common.number(float, above=0), default=1e-5, help="weights and branch, cosine to 0 from --weights-from")
    t.add_argument("--lr-scale", type=common.number(float, above=0), default=3e-4, help="activation step sizes and clip ratios, cosine to 0")
    t.add_argument("--lr-wstep", type=common.number(float, 0), default=0.0, help="weight step sizes, cosine to 0 (0: the PTQ recipe's MSE-searched steps stay; Adam moves a step of ~0.05 by ~lr a step, so 3e-4 re-rounded 27%% of the int4 codes in 300 steps)")
    t.add_argument("--grad-clip", type=common.number(float, above=0), default=1.0, help="gradient norm clipping")
    t.add_argument("--ema", type=common.number(float, 0, 1), default=0.995, help="EMA decay of the trained tensors (0: none); the EMA is exported")
    t.add_argument("--null-p", type=common.number(float, 0, 1), default=0.1, help="share of null labels (--states data)")
    t.add_argument("--states", default="data", choices=("data", "trajectories"), help="data: training images noised at a uniform t; trajectories: a pool of the FP model's own DDIM states at --cfg (what the sampler feeds the model)")
    t.add_argument("--pool", type=common.POSITIVE, default=256, help="--states trajectories: FP trajectories in the pool (50 DDIM steps each, t = 0 out)")
    t.add_argument("--diff-weight", type=common.number(float, 0), default=None, help="λ of the halves' difference (default (cfg - 1)²)")
    t.add_argument("--seed", type=common.number(int, 0), default=0, help="seed of the batches")
    t.add_argument("--state-dir", default="runs/qat", help="folder of the resumable state")
    t.add_argument("--out", default=None, help="write the packed integer checkpoint here at the end")
    t.add_argument("--snapshot-every", type=common.number(int, 0), default=0, help="also export OUT_iterN.pt (the EMA) every N steps, to choose by samples (evaluate.py screen)")
    t.add_argument("--ckpt-every", type=common.POSITIVE, default=100, help="steps between resumable states")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-after", type=common.POSITIVE, default=None, help="stop (and save) after this many steps of this call")
    t.add_argument("--minutes", type=common.number(float, above=0), default=None, help="time budget: stop (and save) after this long")
    t.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    sc = sub.add_parser("score", parents=[shared], help="guided ε MSE per timestep band (t = 0 out) of saved quantized checkpoints on held-out test images")
    sc.add_argument("qckpt", nargs="+")
    sc.add_argument("--t0", action="store_true", help="also the guided error at t = 0 (never trained on nor scored), against the mean band")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        common.check_output(args.out, (args.ckpt,), "--out", args.force)
        if os.path.exists(args.state_dir) and not os.path.isdir(args.state_dir):
            raise ValueError(f"--state-dir {args.state_dir} is a file, not a folder")
        if args.diff_weight is None:
            args.diff_weight = (args.cfg - 1) ** 2
        args.cfg_delta = quant.cfg_delta_default()  # how both_halves codes the CFG pair
    return args


IDENTITY = ("ckpt", "wbits", "abits", "hadamard", "block", "buckets", "init", "act", "iters",
            "weights_from", "batch_size", "lr", "lr_scale", "lr_wstep", "grad_clip", "ema", "null_p",
            "diff_weight", "cfg", "eval_n", "eval_seed", "seed", "states", "pool", "init_alpha",
            "init_lowrank_iters", "cfg_delta")


def rates(step, args):
    """(weights', activation steps', weight steps' rate) at this step: cosine to 0 at --iters;
    weights at 0 before --weights-from."""
    cos = lambda a: 0.5 * (1 + math.cos(math.pi * min(1.0, (step - a) / max(1, args.iters - a))))
    wf = args.weights_from
    return ((0.0 if wf is None or step < wf else args.lr * cos(wf)), args.lr_scale * cos(0),
            args.lr_wstep * cos(0))


def trained(model):
    """Every QuantLinear's weights, branch and steps, in a fixed order."""
    return [p for m in model.modules() if isinstance(m, QuantLinear) for p in steps_of(m, weight=True)]


def averaged(model, ema):
    """A copy of the model holding the EMA of its trained tensors."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(trained(out), ema):
            p.copy_(e)
    return out


def resume(args, state_path, model, opt, gen, ema):
    """Loads a QAT run's state into model, opt, gen and ema -> its step; refuses other settings."""
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"--resume: no QAT state at {state_path}")
    st = common.load_file(state_path, "QAT state")
    now = {k: getattr(args, k) for k in IDENTITY}
    if st["identity"] != now:
        diff = {k: (st["identity"].get(k), v) for k, v in now.items() if st["identity"].get(k) != v}
        raise ValueError(f"--resume: {state_path} was trained with other settings (saved, now): {diff}")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    gen.set_state(st["gen"])
    for e, v in zip(ema, st["ema"]):
        e.copy_(v)
    return st["step"]


def train(args):
    """Runs (or resumes) QAT; returns (EMA model, recipe, cfg, losses of this call). Under torchrun
    the global batch (one generator) is split over the processes, as in train.py."""
    rank, world, device = common.setup_distributed(args.device, args.batch_size)
    fp, cfg = dit.load_checkpoint(args.ckpt)
    fp = fp.to(device).requires_grad_(False).eval()
    if args.states == "data":
        images, labels = data.load("train", args.data_dir)
    else:  # deterministic from --seed: rebuilt the same on resume
        images, labels = None, None
        pool = trajectory_pool(fp, args.pool, cfg_scale=args.cfg, seed=args.seed + 1)
    os.makedirs(args.state_dir, exist_ok=True)
    state_path = os.path.join(args.state_dir, "state.pt")
    model, recipe = prepare(fp, args.wbits, args.abits, args.hadamard, args.block, args.buckets,
                            init=args.init, act=args.act, init_alpha=args.init_alpha,
                            init_lowrank_iters=args.init_lowrank_iters)
    model.eval()  # important! train() would switch on the label embedder's own class dropout
    ho = [v.to(device) for v in held_out(fp, args.eval_n, args.eval_seed, args.data_dir)]
    start, obj = band_errors(model, ho, args.cfg)  # the PTQ start (deterministic: rebuilt on resume)
    band_w = (1 / obj) / (1 / obj).mean()  # each band's error relative to the start's
    params = trained(model)
    weights = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in weights_of(m)}
    wsteps = {id(m.w_scale) for m in model.modules() if isinstance(m, QuantLinear)}
    opt = make_optimizer(model, args.lr, args.lr_scale, args.lr_wstep)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(args.seed)
    step = resume(args, state_path, model, opt, gen, ema) if args.resume else 0
    diffusion = Diffusion.make()

    def save():
        if rank == 0:
            common.atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema,
                                "gen": gen.get_state(), "step": step,
                                "identity": {k: getattr(args, k) for k in IDENTITY}}, state_path)
        if world > 1:
            dist.barrier()

    say = (lambda s: tqdm.write(s)) if rank == 0 else (lambda s: None)
    now = start if step == 0 else band_errors(averaged(model, ema), ho, args.cfg)[0]  # step 0: the start
    say(f"step {step}: {band_report(now, start)}")
    losses, t0, first = [], time.time(), step
    bar = tqdm(total=args.iters, initial=step, desc=f"QAT W{args.wbits}A{args.abits} {args.hadamard}",
               disable=None if rank == 0 else True)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    b = args.batch_size // world
    while step < args.iters:
        lr_w, lr_s, lr_ws = rates(step, args)
        for group, lr in zip(opt.param_groups, (lr_w, lr_s, lr_ws)):
            group["lr"] = lr
        active = lambda p: (lr_w > 0 or id(p) not in weights) and (lr_ws > 0 or id(p) not in wsteps)
        if world == 1:  # what does not learn gets no gradient (nor its cost); DDP's set is fixed
            for p in params:
                p.requires_grad_(active(p))
        if images is not None:
            idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
            batch = noised_batch(images[idx], labels[idx], gen, diffusion, fp.num_classes, args.null_p)
        else:
            idx = torch.randint(0, len(pool[0]), (args.batch_size,), generator=gen)
            batch = [v[idx] for v in pool]
        batch = [v[rank * b:(rank + 1) * b].to(device) for v in batch]
        loss = qat_loss(net, fp, batch, band_w, args.diff_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the processes = the global batch's mean
        for p in params:
            if not active(p):  # under DDP: as if frozen (no clipping share, no Adam state)
                p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], args.grad_clip)
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))  # a short warm-up of the average
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - d)
        lv = loss.detach()
        if world > 1:
            dist.all_reduce(lv)
            lv = lv / world
        losses.append(lv.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3e}")
        done = step == args.iters or (args.stop_after and step - first >= args.stop_after) or \
            (args.minutes and time.time() - t0 > 60 * args.minutes)
        if step % args.ckpt_every == 0 or done:
            save()
        if args.snapshot_every and step % args.snapshot_every == 0:
            avg = averaged(model, ema)
            say(f"step {step} ({(time.time() - t0) / 60:.1f} min): {band_report(band_errors(avg, ho, args.cfg)[0], start)}")
            if rank == 0 and args.out:
                export(avg, recipe, cfg, snapshot_path(args.out, step), calibration(args))
        if done:
            break
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return averaged(model, ema), recipe, cfg, losses

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


def make_optimizer(model, lr, lr_scale, lr_wstep=0.0):
    """AdamW over the QuantLinears: weights at lr, activation steps and clip ratios (LSQ) at
    lr_scale, weight steps at lr_wstep."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return torch.optim.AdamW([{"params": [p for q in qs for p in weights_of(q)], "lr": lr},
                              {"params": [p for q in qs for p in steps_of(q) if p is not q.w_scale],
                               "lr": lr_scale},
                              {"params": [q.w_scale for q in qs], "lr": lr_wstep}],
                             weight_decay=0)


def lesson(steps=20, n=16, data_dir=None):
    """`python qat.py` with no arguments: W4A4 clip ratios learned for a few steps on the FP
    model's own DDIM states at CFG 4.0, the held-out error per band (test images) going down."""
    t0 = time.time()
    fp = dit.load_checkpoint(dit.DEFAULT_CKPT)[0].requires_grad_(False).eval()
    model, _ = prepare(fp, 4, 4, "double", init="svdquant-hadanorm", calib_n=4, calib_steps=10)
    model.eval()  # important! no label dropout
    pool = trajectory_pool(fp, 8)  # 8 trajectories x 49 DDIM states
    ho = held_out(fp, 8, data_dir=data_dir)
    start, obj = band_errors(model, ho)
    band_w = (1 / obj) / (1 / obj).mean()
    opt, gen = make_optimizer(model, 1e-5, 1e-3), torch.Generator().manual_seed(0)
    for p in trained(model):  # the clip ratios only: the recipe that paid (docs/qat.md)
        p.requires_grad_(p.dim() <= 1)
    print(f"W4A4 SVDQuant-HadaNorm (double Hadamard): clip ratios learned on {len(pool[0])} DDIM states of {dit.DEFAULT_CKPT} at CFG 4.0, batch {n}, against its ε")
    print(f"  step   0  {band_report(start, start)}")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pool[0]), (n,), generator=gen)
        loss = qat_loss(model, fp, [v[idx] for v in pool], band_w, 9.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"  step {step:3d}  {band_report(band_errors(model, ho)[0], start)}")
    print(f"{steps} steps in {time.time() - t0:.0f} s; a real run: python qat.py @config/qat_w4a4_traj.args   (see docs/qat.md)")


def weight_drift(a, b):
    """How far model b's 4-bit weights are from model a's: the share of int4 codes that differ and
    the range of b's weight steps over a's."""
    la = [m for m in a.modules() if isinstance(m, integer.IntLinear)]
    lb = [m for m in b.modules() if isinstance(m, integer.IntLinear)]
    if len(la) != len(lb) or any(x.w_t.shape != y.w_t.shape for x, y in zip(la, lb)):
        return "weights not comparable"
    changed = sum((x.w_t != y.w_t).sum().item() for x, y in zip(la, lb))
    r = torch.cat([(y.w_step / x.w_step).flatten() for x, y in zip(la, lb)])
    return f"int4 codes changed {100 * changed / sum(x.w_t.numel() for x in la):.1f}%, weight steps {r.min():.2f}-{r.max():.2f}x"


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
        fp = dit.load_checkpoint(args.ckpt)[0].requires_grad_(False).eval()
        ho = held_out(fp, args.eval_n, args.eval_seed, args.data_dir)
        ho0 = held_out(fp, args.eval_n, args.eval_seed, args.data_dir, at_t0=True) if args.t0 else None
        print(f"guided ε MSE against the FP model at CFG {args.cfg:g}, {args.eval_n} held-out test images x 10 timesteps (seed {args.eval_seed}):")
        first = first_model = None
        for path in args.qckpt:
            model = integer.load_quantized(path)[0]
            integer.to_integer(model)  # a file calibrate.py wrote holds the simulated form
            g = band_errors(model, ho, args.cfg)[0]
            first = g if first is None else first
            line = f"{path}: {band_report(g, first)}"
            if first_model is None:
                first_model = model
            else:
                line += f"; {weight_drift(first_model, model)}"
            if ho0 is not None:
                e0 = band_errors(model, ho0, args.cfg)[0][0]
                line += f"; t = 0: {e0:.2e} ({e0 / g.mean():.0f}x the mean band)"
            print(line)
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
