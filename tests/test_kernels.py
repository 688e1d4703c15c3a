"""kernels.py: the C activation kernel gives the torch reference's codes (up to exact rounding
ties), the fused GELU pass equals GELU then quantization, the integer GEMMs are exact, fallbacks
work."""
import pytest
import torch

import hadamard
import integer
import kernels

KERNEL, WHY = kernels.kernel_status()
needs_kernel = pytest.mark.skipif(not KERNEL, reason=f"C kernel unavailable: {WHY}")


def assert_codes_match_up_to_ties(got, want, v, max_frac=1e-4):
    """Codes equal except where the reference's unrounded value v = x̃ / step lies on a .5 boundary
    (the kernel sums in another order, so it may land a hair on the other side): there by one."""
    diff = got.to(torch.int16) - want.to(torch.int16)
    bad = diff != 0
    assert bad.float().mean().item() <= max_frac, f"{bad.sum().item()} codes differ"
    if bad.any():
        frac = (v[bad] - v[bad].floor() - 0.5).abs()
        assert (frac < 1e-4).all() and (diff[bad].abs() == 1).all(), "a code differs away from a rounding tie"


CASES = [  # K, keyword arguments of act_quant
    (192, dict()),
    (192, dict(center=True)),
    (192, dict(center=True, scale="s", rotate=True)),  # HadaNorm, 192 = 12·16
    (768, dict(center=True, scale="s", rotate=True)),  # 12·64: butterflies beyond 16
    (384, dict(rotate=True, signs="r")),  # QuaRot-style random signs, 12·32
    (192, dict(rotate=True, block=64)),  # block-diagonal
    (192, dict(rotate=True, block=8)),  # blocks below 16: the scalar rotation
    (72, dict(rotate=True, center=True)),  # DiT-XL's head width 36·2
    (1152, dict(center=True, scale="s", rotate=True)),  # DiT-XL/2: 36·32
    (192, dict(mean="static", scale="s", rotate=True)),
    (192, dict(center=True, rotate=True, ratio="r")),  # QAT's learned clip ratio per sample
    (192, dict(rotate=True, step="s")),  # static steps per sample
    (192, dict(center=True, rotate=True, dup16=True)),  # HQ-DM's [q, 16 q]
    # SVDQuant's branch: x V in the same pass
    (192, dict(center=True, scale="s", rotate=True, lora_vt="v")),
    (768, dict(rotate=True, lora_vt="v")),
]


def make(K, kw, S=6, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S * T, K, generator=g) * (1 + torch.rand(K, generator=g)) + torch.randn(K, generator=g)
    kw = dict(kw)
    fills = {"s": lambda: torch.rand(K, generator=g) + 0.5,
             "r": lambda: hadamard.random_signs(K, 3)}
    if kw.get("scale") == "s":
        kw["scale"] = fills["s"]()
    if kw.get("signs") == "r":
        kw["signs"] = fills["r"]()
    if kw.get("mean") == "static":
        kw["mean"] = torch.randn(1, K, generator=g)
    if kw.get("ratio") == "r":
        kw["ratio"] = torch.rand(S, generator=g) * 0.5 + 0.5
    if kw.get("step") == "s":
        kw["step"] = torch.rand(S, generator=g) * 0.3 + 0.1
    if kw.get("lora_vt") == "v":
        kw["lora_vt"] = torch.randn(K, 32, generator=g) / K ** 0.5
    return x, T, kw


@needs_kernel
@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("K,kw", CASES)
def test_c_kernel_gives_the_torch_codes_steps_and_mean(K, kw, bits):
    if kw.get("dup16") and bits > 4:
        pytest.skip("[q, 16 q] is for 4-bit codes and below")
    x, T, kw = make(K, kw)
    qt, st, mt, lt = kernels.act_quant_torch(x, bits, T, **kw)
    qc, sc, mc, lc = kernels.act_quant(x, bits, T, **kw)
    assert qc.dtype == torch.int8 and qc.shape == qt.shape
    torch.testing.assert_close(sc, st, rtol=1e-5, atol=0)
    # the reference's unrounded values, to tell a rounding tie from a real difference
    xs = x.view(-1, T, K)
    mean = xs.mean(1, keepdim=True) if kw.get("center") else kw.get("mean")
    xs = xs - mean.view(-1, 1, K) if mean is not None else xs
    xs = xs / kw["scale"] if kw.get("scale") is not None else xs
    xs = hadamard.transform(xs, block=kw.get("block"), signs=kw.get("signs")) if kw.get("rotate") else xs
    v = (xs.reshape(-1, K) / st)
    assert_codes_match_up_to_ties(qc[:, :K], qt[:, :K], v)
    if kw.get("dup16"):
        assert torch.equal(qc[:, K:], 16 * qc[:, :K])
    if kw.get("center"):
        torch.testing.assert_close(mc, mt, rtol=1e-4, atol=1e-5)
    if kw.get("lora_vt") is not None:
        torch.testing.assert_close(lc, lt, rtol=1e-4, atol=1e-4)  # the low-rank down-projection x V


@needs_kernel
@pytest.mark.parametrize("center,lora", [(True, False), (False, False), (True, True)])
def test_fused_gelu_pass_equals_gelu_then_quantization(center, lora):
    """fc1's accumulator -> dequantise (+ its low-rank branch) -> GELU (tanh form) -> fc2's HadaNorm
    quantizer (+ fc2's low-rank down-projection), in one C pass."""
    g = torch.Generator().manual_seed(1)
    S, T, K, r = 4, 16, 768, 32
    acc = torch.randint(-400, 400, (S * T, K), generator=g, dtype=torch.int32)
    st, ws = torch.rand(S * T, 1, generator=g) * 0.01, torch.rand(K, generator=g) * 0.2
    term = torch.randn(S, K, generator=g)
    scale = torch.rand(K, generator=g) + 0.5
    lr1, ut1, vt2 = ((torch.randn(S * T, r, generator=g), torch.randn(r, K, generator=g) * 0.1,
                      torch.randn(K, r, generator=g) / K ** 0.5) if lora else (None, None, None))
    pre = (acc * st * ws).view(S, T, K) + term.unsqueeze(1)
    pre = pre + (lr1 @ ut1).view(S, T, K) if lora else pre
    h = torch.nn.functional.gelu(pre, approximate="tanh").view(-1, K)
    qt, stt, mt, lt = kernels.act_quant_torch(h, 4, T, center=center, scale=scale, rotate=True,
                                              lora_vt=vt2)
    hk, m = kernels.kernel_args(True, None, K)
    qc, sc, mc, lc = kernels.gelu_quant_c(acc, st, ws, term, 4, T, center, None, scale, None, hk, m,
                                          None, None, False,
                                          0, lr1, ut1, vt2)
    torch.testing.assert_close(sc, stt, rtol=1e-5, atol=0)  # the GELU agrees to a few ulp
    xs = h.view(S, T, K)
    xs = (xs - xs.mean(1, keepdim=True)) if center else xs
    v = hadamard.transform(xs / scale).reshape(-1, K) / stt
    assert_codes_match_up_to_ties(qc, qt, v)
    if center:
        torch.testing.assert_close(mc, mt, rtol=1e-4, atol=1e-5)
    if lora:
        torch.testing.assert_close(lc, lt, rtol=1e-4, atol=1e-4)


def test_int_gemm_is_exact_where_float32_is_not():
    """Sums beyond 2^24 lose their last bits in float32; the integer GEMM keeps every one (a float
    matmul standing in for _int_mm fails here)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(100, 128, (32, 4608), generator=g, dtype=torch.int8)
    w = torch.randint(100, 128, (24, 4608), generator=g, dtype=torch.int8)
    exact = q.long() @ w.long().T  # int64
    assert exact.max() > 2 ** 25
    assert not torch.equal((q.float() @ w.float().T).long(), exact)  # float32 cannot represent it
    got = integer.int_gemm(q, integer.prepare_weight(w, "int_mm"), "int_mm", 24)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact)


def test_onednn_gemm_gives_the_same_integers():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (64, 192), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (96, 192), generator=g, dtype=torch.int8)
    try:
        packed = integer.prepare_weight(w, "onednn")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"oneDNN int8 linear unavailable: {e}")
    got = integer.int_gemm((q.to(torch.int16) + 128).to(torch.uint8), packed, "onednn", 96)
    assert torch.equal(got, (q.long() @ w.long().T).float())


def test_no_compiler_falls_back_to_torch_and_says_so_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(kernels, "_WARNED", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: it must try to build
    ok, why = kernels.kernel_status()
    assert not ok and "no-such-cc" in why
    x, T, kw = make(192, dict(center=True, rotate=True))
    for _ in range(2):
        q, st, mt, _ = kernels.act_quant(x, 4, T, **kw)
    assert torch.equal(q, kernels.act_quant_torch(x, 4, T, **kw)[0])
    assert capsys.readouterr().err.count("using the torch path") == 1
