"""The integer path's hot loops: fused activation quantization, in C and in torch.

In plain torch, quantizing a W4A4 layer's input is a chain of memory passes: centre, divide by the
channel scale, Hadamard, abs-max per token, divide, round, clamp, cast. Here it is one pass per
token row, in two interchangeable implementations:
    act_quant_torch   torch ops: the reference, and the fallback where there is no C compiler
    kernels.c         the same arithmetic in one loop per row: the row stays in L1 while it is centred,
                      scaled, rotated (butterflies over the 2^j factor, then the Paley factor), measured
                      and rounded. Compiled once with the machine's C compiler (cached), called through a
                      torch custom op, so torch.compile treats it as one opaque op.
They give the same codes except where a value lies exactly on a rounding boundary: the kernel sums
in another order, so it may land a hair on the other side. `gelu_quant_c` fuses an MLP's fc1
epilogue, GELU and fc2's quantizer the same way (integer.IntMlp).

    python kernels.py        # kernel vs torch reference: codes and time at the tiny model's and DiT-XL/2's widths
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

import common
import dit
import hadamard

C_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")


#################################################################################
#                   Fused activation quantization: the reference                 #
#################################################################################

def act_quant_torch(x, bits, tokens, center=False, mean=None, scale=None, signs=None, rotate=False,
                    block=None,
                    ratio=None, step=None, dup16=False, offset=0, lora_vt=None):
    """x (M, K), `tokens` rows per sample -> (codes (M, K) int8, steps (M, 1), μ̃ (S, K) or None,
    x V (M, r) or None).

    x̃ = ((x − μ) / scale) Hᵀ, each part optional: μ each sample's mean over its tokens (center; its
    transformed value μ̃ = (μ / scale) Hᵀ is returned) or a given `mean` (1, K). Then per token the
    step max|x̃| · ratio / qmax (ratio (S,) per sample, default 1) or a given step (S,) per sample,
    and the codes clamp(round(x̃ / step)). dup16: codes [q, 16 q] of width 2K (HQ-DM's one-GEMM
    digit form). offset 128: unsigned codes q + 128 (uint8), the form oneDNN's int8 linear takes.
    lora_vt (K, r): a
    low-rank branch's down-projection of the raw rows, returned."""
    M, K = x.shape
    qmax = 2 ** (bits - 1) - 1
    xs = x.view(-1, tokens, K)  # (S, T, K)
    if center:
        mean = xs.mean(1)  # (S, K)
    if mean is not None:
        xs = xs - mean.view(-1, 1, K)
    if scale is not None:
        xs = xs / scale
    if rotate:
        xs = hadamard.transform(xs, block=block, signs=signs)
    if step is None:
        amax = xs.abs().amax(-1, keepdim=True)  # (S, T, 1)
        st = ((amax * ratio.view(-1, 1, 1) if ratio is not None else amax) / qmax).clamp(min=1e-12)
    else:
        st = step.view(-1, 1, 1).expand(xs.shape[0], tokens, 1)
    q = torch.clamp((xs / st).round(), -qmax - 1, qmax).to(torch.int16).view(M, K)
    if dup16:
        q = torch.cat([q, q * 16], dim=-1)  # |q| <= 8, so 16 q still fits a byte  # important!
    q = (q + 128).to(torch.uint8) if offset else q.to(torch.int8)
    mean_t = None
    if center:
        mean_t = mean if scale is None else mean / scale
        mean_t = hadamard.transform(mean_t, block=block, signs=signs) if rotate else mean_t
    return q, st.reshape(M, 1), mean_t, (None if lora_vt is None else x @ lora_vt)


#################################################################################
#                          The C kernels (kernels.c)                             #
#################################################################################

_LIB = None  # the loaded library, or the reason there is none (a string)
_WARNED = False


def _build():
    """Compiles kernels.c for this CPU, cached by source, compiler and CPU flags -> ctypes
    library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc/gcc) on PATH"
    src = open(C_FILE).read()
    # important! no FMA
    flags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
    cpu = torch._C._cpu._get_cpu_capability()
    key = hashlib.sha256((src + cc + " ".join(flags) + repr(sorted(cpu.items()))).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dit4bit")
    path = os.path.join(cache, f"kernels_{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = os.path.join(tmp, "k.so")
            r = subprocess.run([cc, *flags, C_FILE, "-o", out, "-lm"], capture_output=True,
                               text=True)
            if r.returncode != 0:
                return f"{cc} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
            os.replace(out, path)  # atomic: a concurrent build never sees half a file
    lib = ctypes.CDLL(path)
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.act_quant.argtypes = [P, P, P, P, I, I, I, I, P, I, P, P, P, I, I, P, P, I, I, I, P, I, P]
    lib.gelu_quant.argtypes = [P, P, P, P, P, I, P, P, P, I, I, I, I, P, I, P, P, P, I, I, P, P, I,
                               I, I, P, P, I, P, I, P]
    lib.act_quant.restype = lib.gelu_quant.restype = None
    return lib


def kernel_status():
    """(True, library path) when the C kernels are loaded, else (False, why). Builds them on first
    call."""
    global _LIB
    if _LIB is None:
        if os.environ.get("DIT4BIT_NO_KERNEL"):
            _LIB = "disabled by DIT4BIT_NO_KERNEL"
        else:
            try:
                _LIB = _build()
            except OSError as e:
                _LIB = f"could not build or load it: {e}"
    return (True, _LIB._name) if not isinstance(_LIB, str) else (False, _LIB)


def compiler_status():
    """(True, compiler) where torch.compile can build CPU code (it needs a C++ compiler), else
    (False, why)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return (True, cxx) if cxx else (False, "no C++ compiler on PATH for torch.compile")


def kernel_args(rotate, block, width):
    """The kernel's view of the Hadamard: (H_K0 as float32, m) with block = K0 · m, or (None, 1)."""
    if not rotate:
        return None, 1
    km = hadamard.split(block or width)
    if km is None:
        raise hadamard._unsupported(block or width)
    return hadamard.base_matrix(km[0]).float(), km[1]


def _c(t):
    return None if t is None else t.contiguous().float()


def _p(t):
    return None if t is None else t.data_ptr()


def _outputs(M, K, S, dup16, offset):
    q = torch.empty(M, 2 * K if dup16 else K, dtype=torch.uint8 if offset else torch.int8)
    return q, torch.empty(M, 1), torch.empty(S, K)


@torch.library.custom_op("dit4bit::act_quant", mutates_args=())
def act_quant_c(x: torch.Tensor, bits: int, tokens: int, center: bool, mean: Optional[torch.Tensor],
                scale: Optional[torch.Tensor], signs: Optional[torch.Tensor],
                    hk: Optional[torch.Tensor], m: int,
                ratio: Optional[torch.Tensor], step: Optional[torch.Tensor], dup16: bool,
                    offset: int,
                lora_vt: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """kernels.c's act_quant as a torch op: `act_quant_torch`'s arguments and results (μ̃ and x V
    are empty tensors when not asked for), the Hadamard given as (H_K0, m) from `kernel_args`."""
    M, K = x.shape
    x, t = x.contiguous(), [_c(v) for v in (mean, scale, signs, hk, ratio, step, lora_vt)]
    q, steps, mean_t = _outputs(M, K, M // tokens if center else 0, dup16, offset)
    r = 0 if lora_vt is None else lora_vt.shape[1]
    lr = torch.empty(M if r else 0, r)
    _LIB.act_quant(x.data_ptr(), steps.data_ptr(), q.data_ptr(), mean_t.data_ptr(), M, K, tokens,
                   int(center),
                   _p(t[0]), 0 if mean is None or mean.numel() == K else K, _p(t[1]), _p(t[2]),
                       _p(t[3]),
                   0 if hk is None else hk.shape[0], m, _p(t[4]), _p(t[5]), 2 ** (bits - 1) - 1,
                       int(dup16), offset,
                   _p(t[6]), r, lr.data_ptr())
    return q, steps, mean_t, lr


@act_quant_c.register_fake
def _(x, bits, tokens, center, mean, scale, signs, hk, m, ratio, step, dup16, offset, lora_vt):
    M, K = x.shape
    r = 0 if lora_vt is None else lora_vt.shape[1]
    return (x.new_empty(M, 2 * K if dup16 else K, dtype=torch.uint8 if offset else torch.int8),
            x.new_empty(M, 1),
            x.new_empty(M // tokens if center else 0, K), x.new_empty(M if r else 0, r))


@torch.library.custom_op("dit4bit::gelu_quant", mutates_args=())
def gelu_quant_c(acc: torch.Tensor, st: torch.Tensor, ws: torch.Tensor,
                 term: Optional[torch.Tensor], bits: int,
                 tokens: int, center: bool, mean: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor],
                 signs: Optional[torch.Tensor], hk: Optional[torch.Tensor], m: int,
                     ratio: Optional[torch.Tensor],
                 step: Optional[torch.Tensor], dup16: bool, offset: int,
                     lora1: Optional[torch.Tensor],
                 lora1_ut: Optional[torch.Tensor],
                 lora_vt: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """fc1's exact accumulator (M, K) (int32, or float holding integers), its token steps st (M, 1),
    channel steps ws (K,), per-sample addend term (S, K) or (1, K) and low-rank branch lora1 (M, r1)
    @
    lora1_ut (r1, K) -> GELU -> `act_quant_c` of that (lora_vt: fc2's down-projection)."""
    M, K = acc.shape
    acc, t = acc.contiguous(), [_c(v) for v in (st, ws, term, mean, scale, signs, hk, ratio, step,
                                                lora1, lora1_ut,
                                                 lora_vt)]
    q, steps, mean_t = _outputs(M, K, M // tokens if center else 0, dup16, offset)
    r1, r2 = (0 if v is None else v.shape[i] for v, i in ((lora1_ut, 0), (lora_vt, 1)))
    lr = torch.empty(M if r2 else 0, r2)
    is_int = acc.dtype == torch.int32
    _LIB.gelu_quant(acc.data_ptr() if is_int else None, None if is_int else acc.data_ptr(),
                    _p(t[0]), _p(t[1]),
                    _p(t[2]), 0 if term is None or term.shape[0] == 1 else K, steps.data_ptr(),
                        q.data_ptr(),
                    mean_t.data_ptr(), M, K, tokens, int(center), _p(t[3]),
                        0 if mean is None or mean.numel() == K
                    else K, _p(t[4]), _p(t[5]), _p(t[6]), 0 if hk is None else hk.shape[0], m,
                        _p(t[7]), _p(t[8]),
                    2 ** (bits - 1) - 1, int(dup16), offset, _p(t[9]), _p(t[10]), r1, _p(t[11]), r2,
                        lr.data_ptr())
    return q, steps, mean_t, lr


@gelu_quant_c.register_fake
def _(acc, st, ws, term, bits, tokens, center, mean, scale, signs, hk, m, ratio, step, dup16,
      offset, lora1, lora1_ut,
      lora_vt):
    M, K = acc.shape
    r = 0 if lora_vt is None else lora_vt.shape[1]
    return (acc.new_empty(M, 2 * K if dup16 else K, dtype=torch.uint8 if offset else torch.int8),
            acc.new_empty(M, 1, dtype=torch.float32),
                acc.new_empty(M // tokens if center else 0, K, dtype=torch.float32),
            acc.new_empty(M if r else 0, r, dtype=torch.float32))


def act_quant(x, bits, tokens, center=False, mean=None, scale=None, signs=None, rotate=False,
              block=None,
              ratio=None, step=None, dup16=False, offset=0, lora_vt=None, use_kernel=True):
    """Fused activation quantization (`act_quant_torch`'s arguments and results): the C kernel
    where it is available, on the CPU and asked for, else the torch reference. (IntLinear decides
    once, when it is
    built, and calls the two directly: this dispatch is not for compiled code.)"""
    global _WARNED
    if use_kernel and x.device.type == "cpu" and x.dtype == torch.float32:
        ok, why = kernel_status()
        if ok:
            hk, m = kernel_args(rotate, block, x.shape[-1])
            q, st, mu, lr = act_quant_c(x, bits, tokens, center, mean, scale, signs, hk, m, ratio,
                                        step, dup16,
                                        offset, lora_vt)
            return q, st, (mu if center else None), (lr if lora_vt is not None else None)
        if not _WARNED:
            print(f"note: fused activation kernel unavailable ({why}); using the torch path",
                  file=sys.stderr)
            _WARNED = True
    return act_quant_torch(x, bits, tokens, center, mean, scale, signs, rotate, block, ratio, step,
                           dup16, offset,
                           lora_vt)


#################################################################################
#                                  Allocator                                     #
#################################################################################

def tune_allocator():
    """Keeps freed memory in the process (glibc malloc): no mmap per large temporary, no trimming.
    Every forward allocates and frees tens of MB of activations; by default each such block is a
    fresh mmap, so every call pays page faults (measured: 37 s of kernel time in a 60 s W4A4 run,
    and ~25% of a compiled forward). Reused heap memory costs none. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 30),
                                                     (M_TOP_PAD, 64 * 2 ** 20)))


#################################################################################
#                                    Lesson                                      #
#################################################################################

def main():
    ap = common.Parser(description="Lesson: the fused activation kernel against its torch "
                                   "reference "
                                             "(codes and time) at the tiny model's and DiT-XL/2's "
                                             "widths.")
    ap.add_argument("--tokens", type=int, default=10240,
                    help="rows (the tiny model's real batch: 160 x 64)")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    if args.tokens < 64 or args.tokens % 64 or not 2 <= args.bits <= 8:
        raise ValueError("--tokens must be a positive multiple of 64 and --bits in 2..8")
    ok, where = kernel_status()
    cap = torch._C._cpu._get_cpu_capability()
    isa = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16") if cap.get(f)]
    print(f"CPU {cap.get('cpu_name', '?')} ({', '.join(isa) or 'no VNNI/AMX'}), "
          f"{torch.get_num_threads()} threads; "
          f"C kernel: {'built, ' + where if ok else 'unavailable: ' + where}")
    print(f"HadaNorm activation quantization of ({args.tokens}, K), 64 tokens per sample, "
          f"{args.bits} bits:")
    g = torch.Generator().manual_seed(0)
    for K in (192, 768, 1152, 4608):
        x = torch.randn(args.tokens, K, generator=g) + torch.randn(K, generator=g)
        kw = dict(center=True, scale=torch.rand(K, generator=g) + 0.5, rotate=True)
        act_quant(x[:64], args.bits, 64, **kw)  # warm-up (and the kernel's first build)
        t0 = time.perf_counter()
        qt, st, _, _ = act_quant_torch(x, args.bits, 64, **kw)
        t1 = time.perf_counter()
        qc, sc, _, _ = act_quant(x, args.bits, 64, **kw)
        t2 = time.perf_counter()
        print(f"  K={K:5d}: torch {1e3 * (t1 - t0):7.2f} ms, kernel {1e3 * (t2 - t1):6.2f} ms; "
              f"codes equal "
              f"{100 * (qc == qt).float().mean().item():.5f}% (the rest: rounding ties)")


if __name__ == "__main__":
    common.run_cli(main)
