"""quant.py: quantizer levels/clamp/zero point, STE, exact transforms, quantize_model."""
import pytest
import torch
import torch.nn as nn

import dit
import quant
from quant import QConfig, QuantLinear


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_symmetric_levels_and_clamp(bits):
    cfg = QConfig(bits, granularity="tensor")
    x = torch.linspace(-3, 3, 1001).view(1, -1)
    q, s, z = quant.quantize(x, cfg)
    qmin, qmax = quant.levels(cfg)
    assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert q.min() >= qmin and q.max() == qmax and z.abs().max() == 0
    torch.testing.assert_close(s.flatten(), torch.tensor([3.0 / qmax]))
    # a clipped (static) scale clamps instead of wrapping around
    q2, _, _ = quant.quantize(x, cfg, params=(s / 4, z))
    assert q2.min() == qmin and q2.max() == qmax


def test_asymmetric_zero_point_represents_zero_exactly():
    cfg = QConfig(4, symmetric=False)
    x = torch.rand(5, 64) * 3 + 0.5  # all positive: the zero point sits at the bottom
    x[:, 0] = -0.25
    q, s, z = quant.quantize(x, cfg)
    assert q.min() >= 0 and q.max() <= 15
    fq = quant.fake_quant(x, cfg)
    assert ((fq - x).abs() <= s / 2 + 1e-6).all()  # round-to-nearest within range
    zero_in = torch.zeros(5, 64)
    assert quant.fake_quant(zero_in, cfg, (s, z)).abs().max() == 0


def test_groups_and_rows_have_their_own_scales():
    x = torch.randn(4, 256)
    x[:, 128:] *= 100
    g = quant.fake_quant(x, QConfig(4, granularity="group", group_size=128))
    r = quant.fake_quant(x, QConfig(4, granularity="row"))
    assert (g - x)[:, :128].abs().mean() < (r - x)[:, :128].abs().mean() / 3
    with pytest.raises(ValueError, match="does not divide"):
        quant.fake_quant(torch.randn(2, 100), QConfig(4, granularity="group", group_size=64))


def test_mse_range_beats_minmax_on_heavy_tails():
    x = torch.distributions.StudentT(2.0).sample((64, 512))
    e = lambda r: (quant.fake_quant(x, QConfig(4, range=r)) - x).pow(2).mean()
    assert e("mse") < e("minmax")


def test_ste_passes_gradients_inside_the_range():
    x = torch.randn(3, 16, requires_grad=True)
    quant.fake_quant(x, QConfig(4)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bad_bit_width():
    with pytest.raises(ValueError, match="unsupported bit width 1"):
        QConfig(1)


TRANSFORMS = [dict(), dict(rotate=True), dict(rotate=True, center="dynamic"), dict(center="dynamic"),
              dict(scale="s"), dict(scale="s", rotate=True, center="dynamic"), dict(rotate=True, block=64),
              dict(rotate=True, signs="r"), dict(center="static")]


@pytest.mark.parametrize("kw", TRANSFORMS)
def test_transform_is_exact_with_quantization_off(kw):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + 2 * torch.randn(192)
    kw = dict(kw)
    if kw.get("scale") == "s":
        kw["scale"] = torch.rand(192) + 0.5
    if kw.get("signs") == "r":
        kw["signs"] = quant.hadamard.random_signs(192, 3)
    if kw.get("center") == "static":
        kw["static_mean"] = torch.randn(192)
    q = QuantLinear(lin, QConfig(4), QConfig(4), **kw)
    q.quantize_enabled = False
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)


def test_hadanorm_mean_term_uses_the_quantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(192, 64)
    x = torch.randn(2, 8, 192)
    q = QuantLinear(lin, QConfig(4), None, center="dynamic", rotate=True)
    xt, mu = q.transform_input(x)
    torch.testing.assert_close(q(x), (xt + mu) @ q.qweight().T + lin.bias, atol=1e-5, rtol=1e-5)


def test_quantize_model_swaps_the_four_layers_and_refuses_twice():
    m = dit.build(dit.TINY, depth=2)
    quant.quantize_model(m, {"wq": QConfig(4), "aq": QConfig(4), "rotate": True})
    qs = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert qs == [f"blocks.{i}.{p}" for i in range(2) for p in quant.QUANT_LAYERS]
    assert isinstance(m.blocks[0].adaLN_modulation[1], nn.Linear)  # kept in float
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(m, {})


def test_quantized_tiny_model_with_quantization_off_equals_fp():
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=2).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        ref = m(x, t, y)
        quant.quantize_model(m, {"wq": QConfig(4), "aq": QConfig(4), "rotate": True, "center": "dynamic"})
        quant.set_quantization(m, False)
        torch.testing.assert_close(m(x, t, y), ref, atol=1e-5, rtol=1e-4)
        quant.set_quantization(m, True)
        assert not torch.allclose(m(x, t, y), ref, atol=1e-3)


# --- integer path -------------------------------------------------------------------------------

def test_pack_unpack_round_trip_every_int4_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(5, 3)[:, :46]  # odd rows, K = 46
    p = quant.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 23)
    assert torch.equal(quant.unpack_int4(p), q)
    assert quant.pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).item() == 0xF1  # low nibble = even k
    with pytest.raises(ValueError, match="even K"):
        quant.pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        quant.unpack_int4(p.to(torch.int16))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        quant.pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("kw", [dict(), dict(rotate=True), dict(rotate=True, center="dynamic", scale="s")])
def test_integer_path_equals_simulation(bits, kw):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    kw = dict(kw)
    if kw.get("scale") == "s":
        kw["scale"] = torch.rand(192) + 0.5
    q = QuantLinear(lin, QConfig(bits[0], range="mse"), QConfig(bits[1]), **kw)
    xt, _ = q.transform_input(x)
    codes_sim, _, _ = quant.quantize(xt.reshape(-1, 192), q.aq)
    w_sim = q.qweight().clone()
    y_sim = q(x)
    q.to_integer()
    assert q.weight is None and q.w_int.dtype == (torch.uint8 if bits[0] == 4 else torch.int8)
    codes_int, _ = quant.quantize_tokens(xt.reshape(-1, 192), bits[1])
    assert torch.equal(codes_int, codes_sim)  # the very same integers
    torch.testing.assert_close(q.int_weight().float() * q.w_scale, w_sim, atol=1e-6, rtol=0)
    torch.testing.assert_close(q(x), y_sim, atol=1e-5, rtol=1e-5)


def test_integer_path_refuses_unsupported_quantizers():
    q = QuantLinear(nn.Linear(64, 32), QConfig(4, granularity="group", group_size=32), QConfig(4))
    with pytest.raises(ValueError, match="integer path"):
        q.to_integer()


# --- static, per-timestep activation scales ------------------------------------------------------

def test_static_per_timestep_scales_follow_each_samples_timestep():
    import calibrate
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=1).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    aq = QConfig(8, granularity="tensor", dynamic=False, buckets=4)
    quant.quantize_model(m, {"wq": QConfig(8), "aq": aq, "rotate": True})
    calibrate.calibrate_static(m, n=2, steps=8)
    q = m.blocks[0].mlp.fc2
    assert q.a_scale.shape == (4,) and (q.a_scale > 0).all() and q.a_scale.unique().numel() > 1
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        m.forward_with_cfg(torch.cat([x, x]), torch.tensor([10, 900, 10, 900]), torch.tensor([1, 2, 10, 10]), 2.0)
        assert q.t_bucket.tolist() == [0, 3, 0, 3]  # the hook fires under CFG too
        q.t_bucket = torch.tensor([0, 3])
        xin = torch.randn(2, 64, 768)
        xt, _ = q.transform_input(xin)
        codes_sim = quant.quantize_with(xt, q.static_scale(xt), 0.0, aq)  # simulation's integers
        y_sim = q(xin)
        q.to_integer()
        torch.testing.assert_close(q(xin), y_sim, atol=1e-5, rtol=1e-5)  # one layer: float rounding only
        s = q.static_scale(xt)
        assert torch.equal(torch.clamp((xt / s).round(), -128, 127), codes_sim)
        sim = m(x, torch.tensor([10, 900]), y)
        quant.to_integer(m)
        out = m(x, torch.tensor([10, 900]), y)
    # whole model: a value on a rounding boundary may flip one code in a later layer; stays tiny
    assert ((out - sim).abs().max() / sim.abs().max()).item() < 0.05
    assert ((out - sim).abs() > 1e-4).float().mean().item() < 0.02


def test_static_activations_must_be_symmetric_per_tensor():
    with pytest.raises(ValueError, match="static"):
        QConfig(4, granularity="row", dynamic=False)


# --- HQ-DM single Hadamard -----------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 64, 32])
@pytest.mark.parametrize("abits", [4, 3])
def test_single_hadamard_is_exact_and_its_integer_form_matches(block, abits):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    q = QuantLinear(lin, QConfig(4, range="mse"), QConfig(abits), rotate=True, single=True, block=block)
    torch.testing.assert_close(q.weight, lin.weight)  # the weight is NOT rotated
    q.quantize_enabled = False
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)
    q.quantize_enabled = True
    y_sim = q(x)
    q.to_integer()
    digits = q.single_digits()
    M = sum(d.long() * 128 ** p for p, d in enumerate(digits))  # the exact integer matrix
    b = block or 192
    want = quant.hadamard.transform(q.int_weight().double(), block=block) * b ** 0.5
    assert torch.equal(M, want.round().long()) and all(d.abs().max() <= 64 for d in digits)
    torch.testing.assert_close(q(x), y_sim, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,abits,wide", [(192, 4, False), (4608, 8, True)])
def test_single_int_mm_is_exact_in_int32_and_where_int32_could_overflow(k, abits, wide):
    torch.manual_seed(0)
    lin = nn.Linear(k, 8)
    lin.weight.data[0] = 0.1  # a constant row: H concentrates it into one entry of 7·K, the largest |M| can be
    q = QuantLinear(lin, QConfig(4), QConfig(abits), rotate=True, single=True).to_integer()
    M = sum(d.long() * 128 ** p for p, d in enumerate(q.single_digits()))  # (8, K) exact integers
    lo = -(2 ** (abits - 1))
    xq = torch.randint(lo, -lo, (5, k), dtype=torch.int8)
    xq[0] = torch.where(M[0] >= 0, -lo - 1, lo).to(torch.int8)  # near the worst case for row 0
    got = q.single_int_mm(xq)
    assert q._stacked[2] is wide
    assert torch.equal(got, (xq.long() @ M.T).float() / k ** 0.5)


def test_single_needs_rotate():
    with pytest.raises(ValueError, match="single"):
        QuantLinear(nn.Linear(8, 8), single=True)


@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])  # DiT-XL/2 fc1 and fc2: 36·32 and 36·128
def test_xl_width_hadanorm_integer_path_equals_simulation(k, n):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(2, 8, k) + torch.randn(k)
    q = QuantLinear(lin, QConfig(4), QConfig(4), center="dynamic", scale=torch.rand(k) + 0.5, rotate=True)
    xt, _ = q.transform_input(x)
    codes_sim, _, _ = quant.quantize(xt.reshape(-1, k), q.aq)
    y_sim = q(x)
    q.to_integer()
    assert torch.equal(quant.quantize_tokens(xt.reshape(-1, k), 4)[0], codes_sim)
    torch.testing.assert_close(q(x), y_sim, atol=1e-4, rtol=1e-4)


def test_lesson_sqnr_on_real_activations_grows_with_bits_and_finer_scales():
    from conftest import lesson_output
    out = lesson_output("quant.py", "--n", "2", "--steps", "2")
    rows = {}
    for l in out.splitlines():
        parts = l.split()
        if parts and parts[0] in ("8", "4", "3"):
            rows[(int(parts[0]), " ".join(parts[1:-4]))] = [float(v) for v in parts[-4:]]
    assert len(rows) == 9
    for g in ("per tensor", "per token", "per group of 32"):
        assert all(a > b > c for a, b, c in zip(rows[(8, g)], rows[(4, g)], rows[(3, g)]))
    assert all(t > s for t, s in zip(rows[(4, "per token")], rows[(4, "per tensor")]))
