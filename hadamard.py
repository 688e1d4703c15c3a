"""Hadamard matrices of every DiT width and the fast Walsh–Hadamard transform.

A ±1 Hadamard matrix exists for orders 1, 2 and (conjecturally) every multiple of 4. DiT widths are
K·2^j with K in {1, 12, 36}: 384 = 12·32, 1152 = 36·32, head 72 = 36·2. We build H_K in code by
Paley's constructions (no stored tables) and H_{2^j} by Sylvester, and H_n = H_K ⊗ H_{2^j}.

The fast transform on the last axis applies the Kronecker factors one at a time: the 2^j part as
one or two small Sylvester matmuls (H_{2^j} = H_a ⊗ H_b), then one K×K matmul, normalised by 1/√n
so it is orthogonal: `transform(x)` = x Hᵀ for row vectors x, and
`transform(x, inverse=True)` = x H. H_K from Paley is not always symmetric, so the inverse is the
transpose, not H itself.

    python hadamard.py       # outliers before/after on a heavy-tailed tensor, and the 4-bit error
"""
import functools
import math
import time

import torch

import common


#################################################################################
#                              Constructions                                     #
#################################################################################

def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q):
    """Q[i, j] = χ(j - i), χ the quadratic character mod prime q (Legendre symbol)."""
    chi = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                        dtype=torch.float64)


def paley1(q):
    """Order q+1 for prime q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew, S Sᵀ = q I."""
    assert _is_prime(q) and q % 4 == 3
    # exercise paley: build the order-(q+1) Paley-I matrix I + S, S bordered by +1 (row) and -1 (column) around Q
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + S
    # end exercise paley


def paley2(q):
    """Order 2(q+1) for prime q ≡ 1 (mod 4): C ⊗ [[1,1],[1,-1]] + I ⊗ [[1,-1],[-1,-1]], C
    symmetric."""
    assert _is_prime(q) and q % 4 == 1
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


def sylvester(m):
    """Order m = 2^j: H_{2m} = [[H, H], [H, -H]] (symmetric)."""
    assert m >= 1 and m & (m - 1) == 0, f"{m} is not a power of two"
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < m:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=None)
def base_matrix(K):
    """±1 Hadamard matrix of order K (1, 2, or K ≡ 0 mod 4 with a Paley construction), or None."""
    if K in (1, 2):
        return sylvester(K)
    if K % 4:
        return None
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return paley1(K - 1)
    if K % 2 == 0 and _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return paley2(K // 2 - 1)
    return None


def split(n):
    """n = K · 2^j with the smallest constructible K (fewest K×K matmul flops), or None."""
    m = n & -n  # largest power of two dividing n
    while m >= 1:
        if base_matrix(n // m) is not None:
            return n // m, m
        m //= 2
    return None


def _unsupported(n):
    blk = max(b for b in range(1, n + 1) if n % b == 0 and split(b) is not None)
    return ValueError(f"no Hadamard construction for size {n}; use a block-diagonal Hadamard (block={blk} is the largest supported block dividing {n})")


def hadamard_matrix(n, dtype=torch.float32):
    """Dense orthonormal H_n = (H_K ⊗ H_{2^j}) / √n (for tests and offline folding)."""
    km = split(n)
    if km is None:
        raise _unsupported(n)
    K, m = km
    return (torch.kron(base_matrix(K), sylvester(m)) / math.sqrt(n)).to(dtype)


#################################################################################
#                              Fast transform                                    #
#################################################################################

def kron_factors(b, dtype=torch.float32, device="cpu"):
    """The ±1 Kronecker factors (H_K, H_m) of H_b, b = K · m: what `transform` multiplies by. An
    integer layer keeps them as buffers, so that compiled code finds them made."""
    km = split(b)
    if km is None:
        raise _unsupported(b)
    K, m = km
    return base_matrix(K).to(dtype=dtype, device=device), sylvester(m).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _factors_cached(b, dtype, device):
    return kron_factors(b, dtype, device)


def _apply_sylvester(y, hm):
    """y H_m over the last axis (H_m symmetric). Sylvester matrices factor as H_m = H_m1 ⊗ H_m2
    (H_m2 is H_m's top-left block, H_m1 its every m2-th row and column), so large m is two small
    dense matmuls: O(n (m1 + m2)) flops, and BLAS-fast, unlike a Python butterfly of log2(m)
    elementwise passes (measured 2-4x slower here)."""
    m = hm.shape[0]
    if m <= 128:
        return y.contiguous() @ hm  # important! a strided operand (compiled code can make one) is slow
    m2 = m // 2 ** (int(math.log2(m)) // 2)
    z = y.reshape(*y.shape[:-1], m // m2, m2) @ hm[:m2, :m2]  # along m2
    z = hm[::m2, ::m2] @ z  # along m1
    return z.reshape(y.shape)


def transform(x, inverse=False, block=None, signs=None, factors=None):
    """x Hᵀ over the last axis (x H if inverse); any leading shape; float32 or bf16.

    block:   block-diagonal Hadamard of this size (n must be a multiple of it).
    signs:   ±1 vector of length n: the randomised transform x (H D)ᵀ = (x D) Hᵀ; its inverse is (x H) D.
    factors: (H_K, H_m) of the block from `kron_factors()`, in x's dtype; made here when not given.
    """
    n = x.shape[-1]
    b = block or n
    if n % b:
        raise ValueError(f"block size {b} does not divide the width {n}")
    if factors is None:
        factors = _factors_cached(b, x.dtype, x.device)
    hk, hm = factors
    K, m = hk.shape[0], hm.shape[0]
    if signs is not None and not inverse:
        x = x * signs.to(x.dtype)
    # exercise fast_hadamard: apply H_K ⊗ H_{2^j} (or its transpose) one Kronecker factor at a time, normalised by 1/√b
    y = x.reshape(*x.shape[:-1], n // b, K, m)  # (..., blocks, K, 2^j)
    if m > 1:
        y = _apply_sylvester(y, hm)  # Sylvester part (symmetric, its own transpose)
    if K > 1:
        y = torch.matmul(hk.T if inverse else hk, y)  # (K, K) @ (..., K, 2^j)
    y = (y * (1.0 / math.sqrt(b))).reshape(x.shape)
    # end exercise fast_hadamard
    if signs is not None and inverse:
        y = y * signs.to(y.dtype)
    return y


def random_signs(n, seed=0):
    """A fixed random ±1 vector (QuaRot's randomised Hadamard H·diag(s))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


#################################################################################
#                                 Demo                                           #
#################################################################################

def kurtosis(x):
    z = (x - x.mean()) / x.std()
    return z.pow(4).mean().item()


def fake_quant_tokens(x, bits=4):
    """Symmetric per-token (row) fake quantization, min-max range: the A4 default."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return (x / s).round().clamp(-qmax - 1, qmax) * s


def main():
    ap = common.Parser(description="Show what a Hadamard transform does to activation outliers.")
    ap.add_argument("--width", type=int, default=192,
                    help="channels (default 192 = 12·16, the tiny DiT)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.width
    if split(n) is None:
        raise _unsupported(n)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.distributions.StudentT(4.0).sample((args.tokens, n))  # heavy-tailed
    out = torch.randperm(n, generator=g)[:4]
    x[:, out] *= 25.0  # a few outlier channels, as in DiT's fc2 / proj inputs
    t0 = time.perf_counter()
    y = transform(x)
    dt = time.perf_counter() - t0
    K, m = split(n)
    print(f"width {n} = {K}·{m}; transform of ({args.tokens}, {n}) in {1e3 * dt:.2f} ms; round-trip error {(transform(y, inverse=True) - x).abs().max():.1e}")
    print(f"{'':12s} {'max/RMS':>8s} {'kurtosis':>9s} {'4-bit rel. error':>17s}")
    for name, v, back in (("raw", x, x), ("Hadamard", y, None)):
        q = fake_quant_tokens(v)
        err = q - v if back is not None else transform(q, inverse=True) - x  # error in x's space
        print(f"{name:12s} {(v.abs().max() / v.pow(2).mean().sqrt()).item():8.1f} {kurtosis(v):9.1f} {(err.pow(2).sum() / x.pow(2).sum()).item():17.4f}")


if __name__ == "__main__":
    common.run_cli(main)
