"""Speed and memory of the integer kernels, side by side in one run (DESIGN §7). A benchmark, not a test.

Per layer y = x Wᵀ (M tokens, K in, N out): fp32 and bf16 F.linear; `torch._int_mm` on ready int8
operands (the bound: no quantisation, no unpacking); our QuantLinear integer path at W8A8, W4A8,
W4A4 packed, W4A4 + Hadamard, W4A4 + HadaNorm; W4A16 through torch's int4 weight-only kernel.
End to end: a DiT-XL/2 forward on random weights and the tiny model's 50-step sampling.
Medians over repeats after warm-up; GFLOP/s = 2MKN / t; ratios to fp32 and bf16.

    python bench.py --quick          # < 60 s smoke run
    python bench.py                  # the README table (minutes)
    python bench.py --device cuda    # the same on a GPU
"""
import argparse
import platform
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit
import quant
from quant import QConfig, QuantLinear

TINY_SHAPES = [(192, 576), (192, 192), (192, 768), (768, 192)]  # qkv, proj, fc1, fc2 of DiT-T/4
XL_SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152)]


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


def int4_weight_only(w, device, group=32):
    """W4A16 with torch's own int4 weight-only kernel (asymmetric, groups of 32). Returns fn(x)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)  # (N, G)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale  # torch dequantises (q - 8) * scale + zero
    sz = torch.stack([scale.T, zero.T], -1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    if device == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(device), 8)
    sz = sz.to(device)
    return lambda x: torch._weight_int4pack_mm(x, packed, group, sz)


def compiled_row(q, x, device, repeats, nbytes):
    """The same integer layer through torch.compile (fuses quantise / unpack / dequantise); the
    compile cost is paid once and reported. Without a working compiler: reported, eager is kept."""
    t0 = time.time()
    try:
        f = torch.compile(q.forward_int)
        f(x)
    except Exception as e:  # no C++ compiler / unsupported backend: the eager path still works
        return (f"W4A4 + HadaNorm, torch.compile (unavailable: {type(e).__name__})", float("nan"), nbytes)
    return (f"W4A4 + HadaNorm, torch.compile (compile {time.time() - t0:.0f} s)", timeit(lambda: f(x), device, repeats), nbytes)


def layer_rows(M, K, N, device, repeats, tokens_per_sample=256, compile=False):
    """All variants for one shape -> list of (name, seconds, weight bytes)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data = torch.randn(N, K, generator=g) / K ** 0.5
    x = torch.randn(max(1, M // tokens_per_sample), min(M, tokens_per_sample), K, generator=g)  # (B, T, K)
    x32, w32 = x.to(device), lin.weight.data.to(device)
    xb, wb = x32.bfloat16(), w32.bfloat16()
    xi = torch.randint(-8, 8, (M, K), dtype=torch.int8, device=device)
    wi = torch.randint(-8, 8, (N, K), dtype=torch.int8, device=device)
    rows = [("fp32 F.linear", timeit(lambda: F.linear(x32, w32), device, repeats), 4 * N * K),
            ("bf16 F.linear", timeit(lambda: F.linear(xb, wb), device, repeats), 2 * N * K),
            ("int8 _int_mm alone (bound)", timeit(lambda: torch._int_mm(xi, wi.T), device, repeats), N * K)]
    for name, wbits, abits, kw in (("W8A8", 8, 8, {}), ("W4A8", 4, 8, {}), ("W4A4 packed", 4, 4, {}),
                                   ("W4A4 + Hadamard", 4, 4, dict(rotate=True)),
                                   ("W4A4 + HadaNorm", 4, 4, dict(rotate=True, center="dynamic",
                                                                  scale=torch.rand(K, generator=g) + 0.5))):
        q = QuantLinear(lin, QConfig(wbits), QConfig(abits), **kw).to_integer().to(device)
        nbytes = q.w_int.numel() * q.w_int.element_size() + 4 * N
        rows.append((name, timeit(lambda: q(x32), device, repeats), nbytes))
    if compile:
        rows.append(compiled_row(q, x32, device, repeats, nbytes))
    try:
        f = int4_weight_only(lin.weight.data, device)
        rows.append(("W4A16 torch int4 kernel", timeit(lambda: f(xb.reshape(M, K)), device, repeats), N * K // 2 + 4 * N * K // 32))
    except (RuntimeError, NotImplementedError) as e:  # kernel missing on this build/device
        rows.append((f"W4A16 (unavailable: {str(e)[:40]})", float("nan"), N * K // 2))
    return rows


def print_layer_table(M, K, N, rows):
    t32, tbf = rows[0][1], rows[1][1]
    print(f"\n**M={M}, K={K}, N={N}**\n")
    print("| kernel | median ms | GFLOP/s | × vs fp32 | × vs bf16 | weight bytes | × smaller than fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, t, nb in rows:
        print(f"| {name} | {1e3 * t:.3f} | {2 * M * K * N / t / 1e9:.1f} | {t32 / t:.2f} | {tbf / t:.2f} | "
              f"{nb:,d} | {4 * N * K / nb:.1f} |")


@torch.no_grad()
def xl_forward(device, repeats, quick):
    """DiT-XL/2 forward on random weights, batch 2 x 256 tokens: fp32, bf16, W4A4 HadaNorm integer."""
    torch.manual_seed(0)
    m = dit.DiT_models["DiT-XL/2"]()
    for name, _, _, lin in quant.quant_layers(m):
        lin.weight.data.normal_(0, 0.02)
    m.eval()
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), torch.tensor([1, 2])
    out = [("fp32", timeit(lambda: m.to(device)(x.to(device), t.to(device), y.to(device)), device, repeats, 1))]
    mb = m.to(torch.bfloat16)
    out.append(("bf16", timeit(lambda: mb(x.to(device, torch.bfloat16), t.to(device), y.to(device)), device, repeats, 1)))
    m = m.float()
    quant.quantize_model(m, {"wq": QConfig(4), "aq": QConfig(4), "rotate": True, "center": "dynamic"})
    quant.to_integer(m)
    m.to(device)
    out.append(("W4A4 HadaNorm integer", timeit(lambda: m(x.to(device), t.to(device), y.to(device)), device, repeats, 1)))
    return out


def tiny_sampling(device, n, steps):
    """The tiny model's DDIM sampling, fp32 vs W4A4 HadaNorm integer (shipped checkpoint if present)."""
    from diffusion import class_labels
    from sample import generate
    import calibrate
    try:
        fp, _ = dit.load_checkpoint(dit.DEFAULT_CKPT)
    except FileNotFoundError:
        fp = dit.build(dit.TINY)
    labels = class_labels(n, list(range(10)))
    out = [("fp32", timeit(lambda: generate(fp, labels, steps), "cpu", 1, 0))]
    q, _ = (dit.load_checkpoint(dit.DEFAULT_CKPT) if device == "cpu" else (None, None))
    if q is not None:
        calibrate.quantize_fp(q, "hadanorm", 4, 4, calib_n=4, calib_steps=5)
        out.append(("W4A4 HadaNorm simulated", timeit(lambda: generate(q, labels, steps), "cpu", 1, 0)))
        quant.to_integer(q)
        out.append(("W4A4 HadaNorm integer", timeit(lambda: generate(q, labels, steps), "cpu", 1, 0)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark packed-INT4 integer kernels against fp32/bf16/int8 peers.")
    ap.add_argument("--quick", action="store_true", help="two shapes, few repeats, no XL forward (< 60 s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (XL shapes, M=4096)")
    args = ap.parse_args(argv)
    dit.check_device(args.device)
    dev = args.device
    repeats = args.repeats or (3 if args.quick else 10)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench: torch {torch.__version__}, {dev} ({name})")
    if args.quick:
        shapes = [(512, *TINY_SHAPES[2]), (512, *XL_SHAPES[1])]
    else:
        shapes = [(64 * 160, k, n) for k, n in TINY_SHAPES] + [(m, k, n) for m in (512, 1024, 4096) for k, n in XL_SHAPES]
    t0 = time.time()
    for M, K, N in shapes:
        compile = not args.quick and not args.no_compile and M >= 4096 and K >= 1152
        print_layer_table(M, K, N, layer_rows(M, K, N, dev, repeats, compile=compile))
    if not args.quick:
        print("\n**DiT-XL/2 forward, batch 2 x 256 tokens, random weights**\n\n| precision | median s | × vs fp32 | × vs bf16 |\n|---|---|---|---|")
        rows = xl_forward(dev, 3, args.quick)
        for n, t in rows:
            print(f"| {n} | {t:.3f} | {rows[0][1] / t:.2f} | {rows[1][1] / t:.2f} |")
    n, steps = (2, 5) if args.quick else (10, 50)
    print(f"\n**Tiny model sampling, {n} images, DDIM {steps} steps, CFG 4.0**\n\n| model | s |\n|---|---|")
    for nm, t in tiny_sampling(dev, n, steps):
        print(f"| {nm} | {t:.2f} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; bench took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    dit.run_cli(main)
