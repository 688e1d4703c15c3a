"""Speed and memory of the integer path against its float peers, side by side in one run. A
benchmark, not a test: ratios within one run are what to compare (machines differ, and so do days on
one machine).

Per layer y = x Wᵀ (M tokens, K in, N out): fp32 and bf16 F.linear (eager, and bf16 compiled: the
strongest float peer); the int8 bound (`torch._int_mm` on ready operands, no quantization around
it) beside oneDNN's u8 x s8 int8 linear (VNNI's native form, which IntLinear would need a zero-point
correction to use); our IntLinear at W8A8, W4A4 HadaNorm, W4A4 HQ-DM (single Hadamard) and
SVDQuant-HadaNorm, eager and compiled, everything included (transform, quantization, GEMM,
dequantization, mean term, branch); W4A16 through torch's int4 weight-only kernel. End to end: a
DiT-XL/2 forward on random weights, and the tiny model sampling as `sample.py` runs it, every model
interleaved over rounds, with user and system CPU time.

    python bench.py --quick          # < 1 min smoke run
    python bench.py                  # the tables in docs/speed.md (~15 min on 2 cores)
    python bench.py --device cuda    # the same on a GPU
"""
import copy
import os

import platform
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import calibrate
import dit
import integer
import quant
import sample
from diffusion import class_labels
from quant import QConfig, QuantLinear

TINY_SHAPES = [(192, 576), (192, 192), (192, 768), (768, 192)]  # qkv, proj, fc1, fc2 of DiT-T/4
XL_SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152)]
VARIANTS = [("W8A8", 8, 8, {}),  # (name, weight bits, activation bits, QuantLinear arguments)
            ("W4A4 HadaNorm", 4, 4, dict(hadamard="double", center="dynamic", channel_scale="s")),
            ("W4A4 HQ-DM", 4, 4, dict(hadamard="single", center="dynamic", channel_scale="s")),
            ("W4A4 SVDQuant-HadaNorm r32", 4, 4,
             dict(hadamard="double", center="dynamic", channel_scale="s", lowrank=32))]


def timeit(fn, device, repeats, warmup=2):
    """Median seconds of fn() after warm-up (synchronising on CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine(device):
    """One line: the processor, its int8 / bf16 instructions (the ranking depends on them),
    threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cap = torch._C._cpu._get_cpu_capability()
    isa = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16") if cap.get(f)]
    return (f"{cap.get('cpu_name') or platform.processor() or platform.machine()}, ISA: {', '.join(isa) or 'no VNNI/AMX'}, {torch.get_num_threads()} threads")


def int4_weight_only(w, device, group=32):
    """W4A16 with torch's own int4 weight-only kernel (asymmetric, groups of 32). Returns fn(x)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)  # (N, G)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    sz = torch.stack([scale.T, (lo + 8 * scale).T], -1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    if device == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device), 8)
    return lambda x: torch._weight_int4pack_mm(x, packed, group, sz.to(device))


def compiled(f, x):
    """torch.compile(f), compiled on x -> (callable, seconds spent compiling)."""
    t0 = time.time()
    torch._dynamo.reset()  # every row its own compile: no shared recompile limit, no stale graphs
    c = torch.compile(f)
    c(x)
    return c, time.time() - t0


@torch.no_grad()
def layer_rows(M, K, N, device, repeats, compile=True, tokens=256):
    """Every variant at one shape -> [(name, seconds, stored bytes, resident bytes)]."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N, bias=True)
    lin.weight.data = torch.randn(N, K, generator=g) / K ** 0.5
    # (samples, tokens, K)
    x = torch.randn(max(1, M // tokens), min(M, tokens), K, generator=g).to(device)
    xb, w32 = x.bfloat16(), lin.weight.data.to(device)
    wb = w32.bfloat16()
    rows = [("fp32 F.linear", timeit(lambda: F.linear(x, w32), device, repeats), 4 * N * K, 4 * N * K),
            ("bf16 F.linear", timeit(lambda: F.linear(xb, wb), device, repeats), 2 * N * K,
             2 * N * K)]
    if compile:
        c, _ = compiled(lambda v: F.linear(v, wb), xb)
        rows.append(("bf16 F.linear, compiled", timeit(lambda: c(xb), device, repeats), 2 * N * K,
                     2 * N * K))
    qi = torch.randint(-8, 8, (x.shape[0] * x.shape[1], K), dtype=torch.int8, device=device)
    wi = torch.randint(-8, 8, (K, N), dtype=torch.int8, device=device)
    rows.append(("int8 GEMM alone (_int_mm; the bound)",
                 timeit(lambda: torch._int_mm(qi, wi), device, repeats), N * K, N * K))
    if device == "cpu":  # VNNI multiplies u8 x s8: oneDNN's int8 linear on codes + 128
        try:
            packed = torch.ops.onednn.qlinear_prepack(wi.t().contiguous(), None)
            qu, ones = (qi.to(torch.int16) + 128).to(torch.uint8), torch.ones(N)
            zeros = torch.zeros(N, dtype=torch.int64)
            f = lambda: torch.ops.onednn.qlinear_pointwise(qu, 1.0, 128, packed, ones, zeros, None,
                                                           1.0, 0, torch.float32, "none", [], "")
            rows.append(("int8 GEMM alone (oneDNN u8 x s8 linear)", timeit(f, device, repeats),
                         N * K, N * K))
        except (RuntimeError, NotImplementedError):  # not built into this torch
            pass
    for name, wbits, abits, kw in VARIANTS:
        kw = dict(kw, channel_scale=torch.rand(K, generator=g) + 0.5) if "channel_scale" in kw else kw
        rank = kw.pop("lowrank", 0)
        q = QuantLinear(lin, QConfig(wbits), QConfig(abits), **kw)
        if rank:
            calibrate.lowrank_branch(q, rank)  # the float rank-r branch beside the 4-bit residual
        q = integer.to_integer(q).to(device)
        stored, resident = q.w_int.numel() + 4 * N, q.w_t.numel() + 4 * N
        rows.append((name, timeit(lambda: q(x), device, repeats), stored, resident))
        if compile:
            c, sec = compiled(q, x)
            rows.append((f"{name}, compiled ({sec:.0f} s)", timeit(lambda: c(x), device, repeats),
                         stored, resident))
    try:
        f = int4_weight_only(lin.weight.data, device)
        rows.append(("W4A16 torch int4 kernel",
                     timeit(lambda: f(xb.reshape(-1, K)), device, repeats),
                     N * K // 2 + 4 * N * K // 32, N * K // 2 + 4 * N * K // 32))
    except (RuntimeError, NotImplementedError) as e:  # kernel missing on this build / device
        rows.append((f"W4A16 (unavailable: {str(e)[:40]})", float("nan"), N * K // 2, N * K // 2))
    return rows


def print_layer_table(M, K, N, rows):
    t32, tbf = rows[0][1], rows[1][1]
    tbc = next((t for n, t, *_ in rows if n.startswith("bf16 F.linear, compiled")), float("nan"))
    bound = next(t for n, t, *_ in rows if n.startswith("int8 GEMM alone (_int_mm"))
    print(f"\n**M={M}, K={K}, N={N}**\n")
    print("| kernel | median ms | GFLOP/s | × fp32 | × bf16 | × bf16 compiled | of the int8 bound | weight bytes stored | resident |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t, stored, resident in rows:
        print(f"| {name} | {1e3 * t:.3f} | {2 * M * K * N / t / 1e9:.1f} | {t32 / t:.2f} | {tbf / t:.2f} | {tbc / t:.2f} | {bound / t:.2f} | {stored:,d} | {resident:,d} |")


@torch.no_grad()
def xl_forward(device, repeats, compile=True):
    """DiT-XL/2 forward on random weights, batch 2 x 256 tokens: fp32, bf16 eager and compiled,
    W4A4 HadaNorm integer eager and compiled as sample.py compiles (each block), fp32 and bf16 float
    parts."""
    torch.manual_seed(0)
    m = dit.DiT_models["DiT-XL/2"]().eval()
    for _, _, _, lin in quant.quant_layers(m):
        lin.weight.data.normal_(0, 0.02)
    x = torch.randn(2, 4, 32, 32, device=device)
    t, y = torch.tensor([10, 500], device=device), torch.tensor([1, 2], device=device)
    m.to(device)
    out = [("fp32", timeit(lambda: m(x, t, y), device, repeats, 1))]
    mb = copy.deepcopy(m).to(torch.bfloat16)
    out.append(("bf16", timeit(lambda: mb(x, t, y), device, repeats, 1)))
    if compile:
        c, sec = compiled(lambda v: mb(v, t, y), x)
        out.append((f"bf16, compiled ({sec:.0f} s)", timeit(lambda: c(x), device, repeats, 1)))
    quant.quantize_model(m, quant.Recipe("hadanorm", QConfig(4), QConfig(4), center="dynamic",
                                         hadamard="double"))
    integer.to_integer(m)
    out.append(("W4A4 HadaNorm integer", timeit(lambda: m(x, t, y), device, repeats, 1)))
    if compile:
        for bf16 in (False, True):
            mi = copy.deepcopy(m)
            torch._dynamo.reset()
            t0 = time.time()
            how = sample.accelerate(mi, "on", bf16)
            mi(x, t, y)
            out.append((f"W4A4 HadaNorm integer, {how} ({time.time() - t0:.0f} s)",
                        timeit(lambda: mi(x, t, y), device, repeats, 1)))
    return out


def tiny_models(device, quick, qckpts=()):
    """(name, model) to sample: the FP model eager (sample.py's default) and compiled, bf16
    compiled, and the shipped or calibrated quantized models, compiled as `sample.py` runs them."""
    if not os.path.exists(dit.DEFAULT_CKPT):
        return [("fp32 eager (random weights)", dit.build(dit.TINY).to(device).eval())]
    fp = lambda: dit.load_checkpoint(dit.DEFAULT_CKPT)[0].to(device)
    out = [("fp32 eager", fp())]
    def load(p, delta=True):  # a quantized checkpoint on the integer path
        m = integer.to_integer(integer.load_quantized(p)[0]).to(device)
        quant.set_cfg_delta(m, delta)
        return m
    own = ", each CFG half coded on its own (--cfg-delta off)"
    if qckpts:
        return out + [(f"{os.path.basename(p)} (integer{how})", load(p, not how))
                      for p in qckpts for how in ("", own)]
    if quick:
        m = fp()
        calibrate.quantize_fp(m, "hadanorm", 4, 4, calib_n=2, calib_steps=3)
        return out + [("W4A4 HadaNorm (integer)", integer.to_integer(m).to(device))]
    out += [("fp32 compiled", fp()), ("bf16 compiled (sample.py --bf16 --compile on)", fp())]
    for name, path in (("W4A4 HadaNorm (sample.py --w4a4 --method hadanorm)", "checkpoints/dit_t4_w4a4_hadanorm.pt"),
                       ("W4A4 SVDQuant-HadaNorm (--method svdquant-hadanorm)",
                        "checkpoints/dit_t4_w4a4_svdquant-hadanorm.pt"),
                       ("W4A4 QAT (sample.py --w4a4)", "checkpoints/dit_t4_w4a4_hqdm.pt")):
        if os.path.exists(path):
            out.append((f"{name} (integer)", load(path)))
            if "QAT" in name:
                out += [(f"{name} (integer{own})", load(path, False)),
                        (f"{name} (integer), bf16 float parts", load(path))]
    return out


def tiny_sampling(device, n, steps, rounds, quick, compile=True, qckpts=()):
    """Each model samples n images (DDIM, CFG 4.0) `rounds` times, interleaved -> [(name, compile s,
    median s, user s, system s)]: CPU time per run from getrusage, so page faults show as system
    time."""
    labels = class_labels(n, list(range(10)))
    runs = []
    # every model's blocks share DiTBlock.forward's code: keep all their compiled graphs
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for name, m in tiny_models(device, quick, qckpts):
        how = sample.accelerate(m, "on" if compile and ("compiled" in name or "integer" in name)
                                else "off", bf16="bf16" in name)
        ct = sample.warm_up(m, labels, 4.0) if how.startswith("compiled") else 0.0
        runs.append([name, m, ct, [], [], []])
    for _ in range(rounds):
        for r in runs:
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            sample.generate(r[1], labels, steps, 4.0)
            r[3].append(time.perf_counter() - t0)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            r[4].append(u1.ru_utime - u0.ru_utime)
            r[5].append(u1.ru_stime - u0.ru_stime)
    med = statistics.median
    return [(r[0], r[2], med(r[3]), med(r[4]), med(r[5])) for r in runs]


def profile(path, device, batch=160, top=12):
    """torch.profiler's table of one eager forward of a quantized checkpoint (after warm-up)."""
    m = integer.load_quantized(path)[0].to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, m.in_channels, 32, 32, generator=g).to(device)
    t, y = torch.full((batch,), 500, device=device), (torch.arange(batch) % 10).to(device)
    with torch.no_grad():
        for _ in range(3):
            m(x, t, y)
        t0 = time.perf_counter()
        with torch.profiler.profile() as p:
            for _ in range(3):
                m(x, t, y)
    print(f"{path}: one eager forward of batch {batch} takes {(time.perf_counter() - t0) / 3 * 1e3:.0f} ms (profiled); per op, summed over the 3 forwards:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None):
    ap = common.Parser(description="Benchmark the integer path against fp32 / bf16 peers, per layer and end to end, side by side.")
    ap.add_argument("--quick", action="store_true",
                    help="one small shape, no compile rows, tiny sampling (< 1 min)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per layer row (default 10, quick 3)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved sampling runs per model")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--parts", nargs="+", default=["tiny", "xl", "forward", "sampling"],
                    choices=["tiny", "xl", "forward", "sampling"],
                    help="layer tables at the tiny model's / DiT-XL/2's shapes, the XL forward, sampling")
    ap.add_argument("--xl-m", nargs="+", type=common.POSITIVE, default=[1024, 4096],
                    help="token counts M of the DiT-XL/2 layer tables")
    ap.add_argument("--profile", metavar="QCKPT", default=None, help="only: where one eager forward of this quantized checkpoint spends its time (torch.profiler, the sampling batch of 2 x 80 images)")
    ap.add_argument("--qckpt", nargs="+", default=[], help="the sampling rows time these quantized checkpoints (integer path) against fp32 eager, instead of the shipped ones")
    args = ap.parse_args(argv)
    common.check_device(args.device)
    if args.repeats is not None and args.repeats < 1 or args.rounds < 1:
        raise ValueError("--repeats and --rounds must be at least 1")
    dev, repeats = args.device, args.repeats or (3 if args.quick else 10)
    compile = not (args.quick or args.no_compile)
    print(f"# bench: torch {torch.__version__}, {dev}: {machine(dev)}; glibc malloc kept: {os.environ.get('MALLOC_MMAP_MAX_') == '0'}")
    t0 = time.time()
    if args.profile:
        return profile(args.profile, dev)
    tiny = [(10240, k, n) for k, n in TINY_SHAPES]
    xl = [(m, k, n) for m in args.xl_m for k, n in XL_SHAPES]
    shapes = [(512, *TINY_SHAPES[2])] if args.quick else \
        (tiny if "tiny" in args.parts else []) + (xl if "xl" in args.parts else [])
    for M, K, N in shapes:
        print_layer_table(M, K, N, layer_rows(M, K, N, dev, repeats, compile))
    if not args.quick and "forward" in args.parts:
        print("\n**DiT-XL/2 forward, batch 2 x 256 tokens, random weights**\n\n| model | median s | × fp32 | × bf16 |\n|---|---|---|---|")
        rows = xl_forward(dev, 3, compile)
        for n, t in rows:
            print(f"| {n} | {t:.3f} | {rows[0][1] / t:.2f} | {rows[1][1] / t:.2f} |")
    if not args.quick and "sampling" not in args.parts:
        return
    n, steps = (2, 3) if args.quick else (80, 50)
    rows = tiny_sampling(dev, n, steps, 1 if args.quick else args.rounds, args.quick, compile,
                         args.qckpt)
    print(f"\n**Tiny model sampling as `sample.py` runs it: {n} images, DDIM {steps}, CFG 4.0 ({1 if args.quick else args.rounds} interleaved rounds, medians)**\n")
    print("| model | compile s | sampling s | × fp32 eager | CPU user s | CPU system s |\n|---|---|---|---|---|---|")
    for name, ct, t, u, s in rows:
        print(f"| {name} | {ct:.1f} | {t:.2f} | {rows[0][2] / t:.2f} | {u:.1f} | {s:.1f} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; bench took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sample.keep_freed_memory()  # as sample.py: freed activations stay in the process
    common.run_cli(main)
