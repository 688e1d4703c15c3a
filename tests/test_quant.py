"""quant.py: quantizer levels/clamp/zero point, STE, exact transforms, quantize_model."""
import pytest
import torch
import torch.nn as nn

import dit
import hadamard
import quant
from quant import QConfig, QuantLinear


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantizer_symmetric_levels_and_clamp(bits):
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


def test_quantizer_asymmetric_zero_point_represents_zero_exactly():
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


def test_quantizer_ste_passes_gradients_inside_the_range():
    x = torch.randn(3, 16, requires_grad=True)
    quant.fake_quant(x, QConfig(4)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bad_bit_width():
    with pytest.raises(ValueError, match="unsupported bit width 1"):
        QConfig(1)


TRANSFORMS = [dict(), dict(hadamard="double"), dict(hadamard="double", center="dynamic"),
              dict(center="dynamic"),
              dict(channel_scale="s"), dict(channel_scale="s", hadamard="double", center="dynamic"),
              dict(hadamard="double", block=64), dict(hadamard="double", signs="r"),
              dict(center="static")]


@pytest.mark.parametrize("kw", TRANSFORMS)
def test_hadanorm_transform_is_exact_with_quantization_off(kw):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + 2 * torch.randn(192)
    kw = dict(kw)
    if kw.get("channel_scale") == "s":
        kw["channel_scale"] = torch.rand(192) + 0.5
    if kw.get("signs") == "r":
        kw["signs"] = hadamard.random_signs(192, 3)
    if kw.get("center") == "static":
        kw["static_mean"] = torch.randn(192)
    q = QuantLinear(lin, QConfig(4), QConfig(4), **kw)
    q.quantize_enabled = False
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)


def test_hadanorm_mean_term_uses_the_quantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(192, 64)
    x = torch.randn(2, 8, 192)
    q = QuantLinear(lin, QConfig(4), None, center="dynamic", hadamard="double")
    xt, mu = q.transform_input(x)
    torch.testing.assert_close(q(x), (xt + mu) @ q.qweight().T + lin.bias, atol=1e-5, rtol=1e-5)


def test_quantize_model_swaps_the_four_layers_and_refuses_twice():
    m = dit.build(dit.TINY, depth=2)
    quant.quantize_model(m, quant.Recipe("hadamard", QConfig(4), QConfig(4), hadamard="double"))
    qs = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert qs == [f"blocks.{i}.{p}" for i in range(2) for p in quant.QUANT_LAYERS]
    assert isinstance(m.blocks[0].adaLN_modulation[1], nn.Linear)  # kept in float
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(m, quant.Recipe("rtn"))


def test_quantized_tiny_model_with_quantization_off_equals_fp():
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=2).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        ref = m(x, t, y)
        quant.quantize_model(m, quant.Recipe("hadanorm", QConfig(4), QConfig(4), center="dynamic",
                                             hadamard="double"))
        quant.set_quantization(m, False)
        torch.testing.assert_close(m(x, t, y), ref, atol=1e-5, rtol=1e-4)
        quant.set_quantization(m, True)
        assert not torch.allclose(m(x, t, y), ref, atol=1e-3)


# --- integer path -------------------------------------------------------------------------------

def test_int4_pack_unpack_round_trip_every_int4_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(5, 3)[:, :46]  # odd rows, K = 46
    p = quant.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 23)
    assert torch.equal(quant.unpack_int4(p), q)
    # low nibble = even k
    assert quant.pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).item() == 0xF1
    with pytest.raises(ValueError, match="even K"):
        quant.pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        quant.unpack_int4(p.to(torch.int16))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        quant.pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


def test_static_activations_must_be_symmetric_per_tensor():
    with pytest.raises(ValueError, match="static"):
        QConfig(4, granularity="row", dynamic=False)


def test_unknown_transform_names_are_refused():
    with pytest.raises(ValueError, match="unknown hadamard"):
        QuantLinear(nn.Linear(8, 8), hadamard="singel")
    with pytest.raises(ValueError, match="center"):
        quant.Recipe("x", center="mean")
    with pytest.raises(TypeError, match="Recipe"):
        quant.quantize_model(dit.build(dit.TINY, depth=1), {"wq": QConfig(4)})


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


def test_recipe_round_trips_and_refuses_unknown_keys():
    r = quant.Recipe("hqdm-single", QConfig(4, range="mse"), QConfig(4, clip=True, buckets=10),
                     center="dynamic", hadamard="single", layer_abits={"blocks.0.mlp.fc2": 8})
    assert quant.Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown recipe keys"):
        quant.Recipe.from_dict(dict(r.to_dict(), smoothing=0.5))
