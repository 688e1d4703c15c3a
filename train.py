"""Trains the full-precision DiT on Fashion-MNIST (AdamW, warmed-up EMA, optional bf16 autocast).

Checkpoints are written atomically every --ckpt-every steps and `--resume` continues exactly: model,
EMA, optimizer, step and the RNG are restored, so a resumed run draws the same batches, timesteps
and noise as an uninterrupted one; a resumed run refuses another model, batch or seed, applies a new
--lr / --ema-decay / --iters (and says so), and its log never repeats a step. The EMA weights are
written in half precision to --out (what `sample.py` loads). Every random draw (images, flips,
timesteps, noise, CFG label dropout) comes from one generator over the *global* batch, and each
process takes its slice, so `torchrun --nproc_per_node=N train.py ...` (DistributedDataParallel:
gloo on CPU, nccl on GPU) computes the same steps as one process, up to float summation order.

    python train.py --iters 20000 --bf16 --run-dir runs/tiny --out runs/tiny/dit_t4.pt
    torchrun --nproc_per_node=2 train.py ...     # same result, the batch split over 2 processes
"""
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import data
import dit
from diffusion import Diffusion


def get_args(argv=None):
    ap = common.Parser(description="Train the tiny DiT on Fashion-MNIST; resumable, atomic checkpoints.")
    ap.add_argument("--model", default=dit.TINY, help=f"config name (default {dit.TINY})")
    ap.add_argument("--iters", type=common.POSITIVE, default=20000, help="total optimizer steps")
    ap.add_argument("--batch-size", type=common.POSITIVE, default=128)
    ap.add_argument("--lr", type=common.number(float, above=0), default=3e-4)
    ap.add_argument("--ema-decay", type=common.number(float, 0, 1), default=0.9999,
                    help="final EMA decay (warmed up from 0)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward")
    ap.add_argument("--seed", type=common.number(int, 0), default=0)
    ap.add_argument("--run-dir", default="runs/tiny",
                    help="folder for the resumable training state and log")
    ap.add_argument("--out", default=None, help="also write the EMA model here (half precision)")
    ap.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    ap.add_argument("--ckpt-every", type=common.POSITIVE, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/state.pt")
    ap.add_argument("--minutes", type=common.number(float, above=0), default=None,
                    help="time budget: stop (and checkpoint) after this long")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's)")
    ap.add_argument("--limit", type=common.POSITIVE, default=None,
                    help="use only the first N training images (tests)")
    ap.add_argument("--threads", type=common.POSITIVE, default=None,
                    help="torch threads (default: torch's choice)")
    ap.add_argument("--log-every", type=common.POSITIVE, default=50,
                    help="steps per line of RUN_DIR/log.jsonl")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda (with torchrun: one GPU per process)")
    args = ap.parse_args(argv)
    if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise ValueError(f"--run-dir {args.run_dir} is a file, not a folder")
    if args.out and os.path.realpath(os.path.dirname(os.path.abspath(args.out))) == os.path.realpath(args.run_dir):
        os.makedirs(args.run_dir, exist_ok=True)  # --out inside the run's own folder
    common.check_output(args.out, (os.path.join(args.run_dir, "state.pt"),), "--out", args.force)
    return args


FIXED = ("model", "batch_size", "seed", "limit", "data_dir")  # a resumed run must agree on these


def trim_log(path, step):
    """Drops log lines past `step` (written after the state being resumed): a resumed log never
    repeats."""
    if os.path.exists(path):
        lines = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= step]
        common.atomic_write_text(path, "".join(lines))


def ema_decay(step, final):
    """Warm-up: (1+step)/(10+step) -> final. A fixed 0.999 from step 0 averages in the random
    init."""
    return min(final, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def model_config(args):
    return {"model": args.model}


def global_batch(gen, x_all, y_all, batch_size, num_classes, p_drop=0.1):
    """Every random draw of one step, for the whole (global) batch, from one generator."""
    idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
    flip = torch.rand(batch_size, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x_all[idx].flip(-1), x_all[idx])  # (B, 1, 32, 32)
    drop = torch.rand(batch_size, generator=gen) < p_drop  # CFG: train the null class too
    y = torch.where(drop, num_classes, y_all[idx])
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    return x, y, t, noise


def resume(args, state_path, model, ema, opt, gen, rank=0):
    """Loads a run's state into model, ema, opt and gen -> its step. Refuses other FIXED settings;
    a new --lr, --ema-decay or --iters applies (said on stderr); log lines past the step go."""
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"--resume: no training state at {state_path}")
    st = common.load_file(state_path, "training state")
    old = st["args"]
    clash = [f"--{k.replace('_', '-')} {old.get(k)} (now {getattr(args, k)})" for k in FIXED
             if old.get(k) != getattr(args, k)]
    if clash:
        raise ValueError(f"--resume: {state_path} was trained with {', '.join(clash)}; resume with the same values or start a new --run-dir")
    dit.load_state_dict_checked(model, st["model"], state_path)
    dit.load_state_dict_checked(ema, st["ema"], state_path)
    opt.load_state_dict(st["opt"])
    for g in opt.param_groups:  # important! the optimizer state carries the old lr
        g["lr"] = args.lr
    gen.set_state(st["data_rng"])
    changed = [k for k in ("lr", "ema_decay", "iters") if old.get(k) != getattr(args, k)]
    if changed and rank == 0:
        print("resuming with " + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (was {old.get(k)})" for k in changed), file=sys.stderr)
    trim_log(os.path.join(args.run_dir, "log.jsonl"), st["step"])
    return st["step"]


def train(args, on_step=None):
    """Runs (or resumes) training; returns the list of losses of the steps run in this call."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = common.setup_distributed(args.device, args.batch_size)
    os.makedirs(args.run_dir, exist_ok=True)
    state_path = os.path.join(args.run_dir, "state.pt")
    x_all, y_all = data.load("train", args.data_dir)
    if args.limit:
        x_all, y_all = x_all[: args.limit], y_all[: args.limit]

    torch.manual_seed(args.seed)
    model = dit.build(args.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    gen = torch.Generator().manual_seed(args.seed)  # every random draw of training
    diffusion = Diffusion.make()
    step = resume(args, state_path, model, ema, opt, gen, rank) if args.resume else 0

    def checkpoint():
        if rank == 0:
            common.atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(),
                                    opt=opt.state_dict(), step=step,
                                    # a kill never leaves half a file
                                    args=vars(args), data_rng=gen.get_state()), state_path)
            if args.out:
                dit.save_checkpoint(args.out, ema, model_config(args), step=step)
        if world > 1:
            dist.barrier()

    # important! eval mode: DiT's only train/eval difference is the label dropout, which
    # global_batch does itself so that every process count sees the same labels
    model.eval()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    b = args.batch_size // world
    losses, t0 = [], time.time()
    log = open(os.path.join(args.run_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=args.iters, initial=step, desc="train", dynamic_ncols=True,
               disable=None if rank == 0 else True)
    while step < args.iters:
        x, y, t, noise = (v[rank * b:(rank + 1) * b].to(device) for v in
                          global_batch(gen, x_all, y_all, args.batch_size, model.num_classes))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = diffusion.loss(net, x, y, t, noise)
        if not torch.isfinite(loss):
            raise ValueError(f"step {step}: the loss is {loss.item()}; stopped, the last state in {args.run_dir} is kept (try a lower --lr, or no --bf16)")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients: the global batch's mean, as one process
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, ema_decay(step, args.ema_decay))
        step += 1
        lv = loss.detach().float()
        if world > 1:
            dist.all_reduce(lv)
            lv /= world
        losses.append(lv.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log and step % args.log_every == 0:
            k = args.log_every
            log.write(json.dumps({"step": step,
                                  "loss": round(sum(losses[-k:]) / len(losses[-k:]), 7),
                                  "elapsed_s": round(time.time() - t0, 1)}) + "\n")
            log.flush()
        if on_step:
            on_step(step, loss.item())
        if step % args.ckpt_every == 0 or step == args.iters:
            checkpoint()
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            checkpoint()
            break
    bar.close()
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return losses


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    losses = train(args)
    n = len(losses)
    if n and int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {n} steps in {time.time() - t0:.0f} s ({n / (time.time() - t0):.2f} steps/s); last-100 mean loss {sum(losses[-100:]) / len(losses[-100:]):.4f}; state in {args.run_dir}"
              + (f"; EMA written to {args.out}" if args.out else ""))


if __name__ == "__main__":
    common.run_cli(main)
