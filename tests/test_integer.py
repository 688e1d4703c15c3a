"""integer.py: IntLinear is built from shapes and filled by its state, gives the simulation's codes
and exactly the output its codes imply, keeps no float weight, multiplies int8 codes with
torch._int_mm, and is exact where float32 is not."""
import pytest
import torch
import torch.nn as nn

import dit
import hadamard
import integer
import quant
from quant import QConfig, QuantLinear


def assert_codes_match_up_to_ties(got, want, v, max_frac=1e-4):
    """Codes equal except where the reference's unrounded value v = x̃ / step lies on a .5 boundary
    (another summation order, compiled code's say, may land a hair on the other side): there by
    one."""
    diff = got.to(torch.int16) - want.to(torch.int16)
    bad = diff != 0
    assert bad.float().mean().item() <= max_frac, f"{bad.sum().item()} codes differ"
    if bad.any():
        frac = (v[bad] - v[bad].floor() - 0.5).abs()
        assert (frac < 1e-4).all() and (diff[bad].abs() == 1).all(), "a code differs away from a tie"


def sim_codes(q, x):
    """The simulated layer's activation codes and unrounded values x̃ / step, (M, K) each."""
    xt, _ = q.transform_input(x)
    v = xt / q.act_step(xt)
    lo, hi = quant.levels(q.aq)
    return torch.clamp(v.round(), lo, hi).to(torch.int8).reshape(-1, q.in_features), \
        v.reshape(-1, q.in_features)


def implied_output(iq, x):
    """What the layer's own codes must give, in float64: the integer GEMM leaves nothing but the
    scales to round."""
    K = iq.in_features
    xt, mu = quant.transform_input(x, iq.center, iq.mu_static, iq.channel_scale,
                                   iq.hk is not None, iq.block, iq.signs)
    st = quant.act_step(xt, iq.a_bits, iq.a_clip, iq.a_scale, iq.t_bucket)
    q = iq.codes(xt, st)
    codes = quant.unpack_int4(iq.w_int) if iq.w_bits <= 4 else iq.w_int
    R, ws = codes.double(), iq.w_scale.double().view(-1)
    if iq.hadamard == "single":  # y = Q(x Hᵀ) H Q(W)ᵀ
        R = hadamard.transform(R, block=iq.block, signs=iq.signs)
    q = q[:, :K].double()
    y = (q @ R.T) * st.expand(*xt.shape[:-1], 1).reshape(-1, 1).double() * ws
    y = y.view(*x.shape[:-1], -1)
    if mu is not None:
        y = y + (mu.double() @ R.T) * ws
    if iq.bias is not None:
        y = y + iq.bias.double()
    if iq.lora_vt is not None:
        y = y + x.double() @ iq.lora_vt.double() @ iq.lora_ut.double()
    return q, y.float()


def check_integer_layer(q, x, compiled=False):
    """q (a QuantLinear) -> its IntLinear: packed weight codes and no float weight, the
    simulation's codes, the output its codes give exactly, and the simulation's output."""
    y_sim, w_sim = q(x), q.qweight().detach()
    codes_sim, v = sim_codes(q, x)
    iq = integer.to_integer(q)
    N, K = iq.out_features, iq.in_features
    assert isinstance(iq, integer.IntLinear) and not hasattr(iq, "weight")
    assert iq.w_int.dtype == (torch.uint8 if iq.w_bits <= 4 else torch.int8)
    assert all(t.numel() < N * K for t in iq.buffers() if t.is_floating_point()), \
        "a float copy of the weight is kept"
    codes = quant.unpack_int4(iq.w_int) if iq.w_bits <= 4 else iq.w_int
    torch.testing.assert_close(codes.float() * iq.w_scale, w_sim, atol=1e-6, rtol=0)
    q_int, ref = implied_output(iq, x)
    assert torch.equal(q_int.to(torch.int8), codes_sim)  # the very same integers
    y = torch.compile(iq)(x) if compiled else iq(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_sim, atol=1e-5, rtol=1e-5)
    return iq


def layer_kw(kw, K=192):
    kw = dict(kw)
    if kw.get("channel_scale") == "s":
        kw["channel_scale"] = torch.rand(K) + 0.5
    if kw.get("signs") == "r":
        kw["signs"] = hadamard.random_signs(K, 3)
    if kw.get("center") == "static":
        kw["static_mean"] = torch.randn(K)
    return kw


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("kw", [dict(), dict(hadamard="double"),
                                dict(hadamard="double", center="dynamic", channel_scale="s"),
                                dict(hadamard="double", center="static", signs="r")])
def test_act_codes_and_output_equal_the_simulation(bits, kw):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    with torch.no_grad():
        check_integer_layer(QuantLinear(nn.Linear(192, 96), QConfig(bits[0], range="mse"),
                                        QConfig(bits[1]), **layer_kw(kw)), x)


def test_low_rank_branch_runs_on_the_raw_input():
    """SVDQuant's branch x̃ Vᵀ Uᵀ moved onto the raw input, through centring, scale and H."""
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(4),
                    **layer_kw(dict(hadamard="double", center="dynamic", channel_scale="s")))
    q.set_lora(torch.randn(96, 8) * 0.1, torch.randn(8, 192) * 0.1)
    with torch.no_grad():
        check_integer_layer(q, torch.randn(2, 16, 192) + torch.randn(192))


def test_compiled_layer_gives_the_same_output():
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(4),
                    **layer_kw(dict(hadamard="double", center="dynamic", channel_scale="s")))
    with torch.no_grad():
        check_integer_layer(q, torch.randn(2, 16, 192) + torch.randn(192), compiled=True)


def test_built_from_shapes_and_filled_by_its_state():
    """gpt-fast's way: an empty IntLinear of the right shapes, filled by load_state_dict, is the
    layer; nothing is quantized or searched to load one."""
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(192, 96), QConfig(4, range="mse"), QConfig(4),
                    **layer_kw(dict(hadamard="double", center="dynamic", channel_scale="s")))
    a = integer.to_integer(q)
    b = integer.IntLinear(192, 96, 4, 4, "dynamic", "double", channel_scale=True)
    assert b.w_int.abs().sum() == 0
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 192)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"w_int", "w_scale", "bias", "channel_scale"}


def test_int_matmul_multiplies_int8_codes_with_int_mm(monkeypatch):
    """The 4-bit path is real: its product is one torch._int_mm call on int8 operands."""
    calls = []
    real = torch._int_mm

    def spy(a, b):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b)
    monkeypatch.setattr(torch, "_int_mm", spy)
    monkeypatch.setattr(integer, "GEMM", "int_mm")  # an AVX2 CPU would pick oneDNN's linear
    torch.manual_seed(0)
    q = integer.to_integer(QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(4),
                                       hadamard="double", center="dynamic"))
    with torch.no_grad():
        q(torch.randn(2, 16, 192))
    assert calls == [(torch.int8, torch.int8, (32, 192), (192, 96))]


@pytest.mark.parametrize("hadamard", ["double", "single"])
def test_onednn_gemm_equals_int_mm_and_is_refused_where_float32_would_round(monkeypatch, hadamard):
    """The GEMM of CPUs without VNNI (oneDNN's u8 x s8 linear, float32 out) gives _int_mm's sums
    exactly; a layer whose sums can pass 2^24 keeps _int_mm whatever is asked."""
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    q = QuantLinear(lin, QConfig(4), QConfig(4), hadamard=hadamard, center="dynamic")
    x = torch.randn(2, 16, 192) * 3
    outs = {}
    for gemm in ("int_mm", "onednn"):
        monkeypatch.setattr(integer, "GEMM", gemm)
        iq = integer.to_integer(q)
        if gemm == "onednn" and iq.gemm != "onednn":
            pytest.skip("this torch has no oneDNN int8 linear")
        assert iq.gemm == gemm
        with torch.no_grad():
            outs[gemm] = iq(x)
    assert torch.equal(outs["int_mm"], outs["onednn"])
    w_t = torch.full((20000, 4), 7, dtype=torch.int8)  # (K, N) 4-bit codes
    assert integer.gemm_for(w_t[:10000], 8, False) == "onednn"  # sums up to 9.0e6 < 2^24
    assert integer.gemm_for(w_t, 8, False) == "int_mm"  # 1.8e7: float32 would round them
    w8 = integer.to_integer(QuantLinear(nn.Linear(192, 48), QConfig(8), QConfig(4)))
    assert w8.gemm == "int_mm"  # AVX2's int16 pairs: 2 · 136 · 127 > 2^15


def test_int_matmul_is_exact_where_float32_rounds():
    """W8A8 at K = 4096 with large codes: sums reach 3e7 > 2^24, which float32 cannot hold; the
    layer's output equals the float64 product of its codes (a float32 matmul would not)."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 48, bias=False)
    lin.weight.data = torch.rand(48, 4096) * 0.5 + 0.5  # all positive: the sums add up
    x = torch.rand(1, 32, 4096) * 0.5 + 0.5
    iq = integer.to_integer(QuantLinear(lin, QConfig(8), QConfig(8)))
    q, ref = implied_output(iq, x)
    exact = q.long() @ iq.w_int.long().T
    assert exact.abs().max() > 2 ** 24 and not torch.equal((q.float() @ iq.w_int.float().T).long(), exact)
    with torch.no_grad():
        torch.testing.assert_close(iq(x), ref, rtol=1e-6, atol=0)


def test_integer_path_refuses_group_wise_weights():
    q = QuantLinear(nn.Linear(64, 32), QConfig(4, granularity="group", group_size=32), QConfig(4))
    with pytest.raises(ValueError, match="integer path"):
        integer.to_integer(q)


def test_bf16_input_runs_the_transform_in_bf16_close_to_float32():
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(4),
                    **layer_kw(dict(hadamard="double", center="dynamic", channel_scale="s")))
    iq = integer.to_integer(q)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    with torch.no_grad():
        y32, y16 = iq(x), iq(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert ((y16.float() - y32).abs().mean() / y32.abs().mean()).item() < 0.05


# --- static, per-timestep activation scales ------------------------------------------------------

def test_static_per_timestep_scales_follow_each_samples_timestep():
    import calibrate
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=1).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    aq = QConfig(8, granularity="tensor", dynamic=False, buckets=4)
    quant.quantize_model(m, quant.Recipe("static", QConfig(8), aq, hadamard="double"))
    calibrate.calibrate_static(m, n=2, steps=8)
    q = m.blocks[0].mlp.fc2
    assert q.a_scale.shape == (4,) and (q.a_scale > 0).all() and q.a_scale.unique().numel() > 1
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        m.forward_with_cfg(torch.cat([x, x]), torch.tensor([10, 900, 10, 900]),
                           torch.tensor([1, 2, 10, 10]), 2.0)
        assert q.t_bucket.tolist() == [0, 3, 0, 3]  # the hook fires under CFG too
        q.t_bucket = torch.tensor([0, 3])
        check_integer_layer(q, torch.randn(2, 64, 768))
        integer.to_integer(m)
        m(x, torch.tensor([10, 900]), y)
        # the integer layers get their buckets too
        assert m.blocks[0].mlp.fc2.t_bucket.tolist() == [0, 3]


# --- HQ-DM single Hadamard -----------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 64, 32])
@pytest.mark.parametrize("abits", [4, 3])
def test_single_hadamard_is_exact_and_its_integer_form_matches(block, abits):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    q = QuantLinear(lin, QConfig(4, range="mse"), QConfig(abits), hadamard="single", block=block)
    torch.testing.assert_close(q.weight, lin.weight)  # the weight is NOT rotated
    q.quantize_enabled = False
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)
    q.quantize_enabled = True
    with torch.no_grad():
        iq = check_integer_layer(q, x)
    codes = quant.unpack_int4(iq.w_int).double()
    # exact integers R = W_int H_rawᵀ, split R = d0 + 16 d1: one GEMM of width 2K
    R = (hadamard.transform(codes, block=block) * (block or 192) ** 0.5).round().long()
    D = iq.w_t.T.long()
    assert D.shape == (96, 384)
    assert torch.equal(D[:, :192] + 16 * D[:, 192:], R) and D[:, :192].abs().max() <= 8


def test_single_hadamard_integer_form_refuses_8_bit_activations():
    q = QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(8), hadamard="single")
    with pytest.raises(ValueError, match="at most 4 bits"):
        integer.to_integer(q)


# DiT-XL/2 fc1 and fc2: 36·32 and 36·128
@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])
def test_xl_width_hadanorm_integer_path_equals_simulation(k, n):
    torch.manual_seed(0)
    x = torch.randn(2, 8, k) + torch.randn(k)
    q = QuantLinear(nn.Linear(k, n), QConfig(4), QConfig(4), center="dynamic",
                    channel_scale=torch.rand(k) + 0.5, hadamard="double")
    with torch.no_grad():
        check_integer_layer(q, x)


def test_act_codes_are_the_rounded_clamped_steps():
    """IntLinear.codes against hand values: round half to even, clamped to [-8, 7] at 4 bits."""
    iq = integer.IntLinear(4, 2, a_bits=4)
    xt = torch.tensor([[[0.26, -0.74, 3.1, -9.0], [0.05, 0.15, -0.25, 0.35]]])
    step = torch.tensor([[[0.5], [0.1]]])
    assert iq.codes(xt, step).tolist() == [[1, -1, 6, -8], [0, 2, -2, 4]]
    assert iq.codes(xt, step).dtype == torch.int8



@pytest.mark.parametrize("kw", [dict(hadamard="double", center="dynamic", channel_scale="s"),
                                dict(hadamard="single")])
def test_cfg_pair_codes_the_null_half_as_its_difference_and_equals_the_simulation(kw):
    """[x_c; x_u] with cfg_pair up: the conditional half coded as before, the null half as
    Q(x̃_c) + Q(x̃_u − x̃_c), integer == simulation; the error of y_u − y_c is the difference's
    rounding alone, far below coding each half on its own."""
    torch.manual_seed(0)
    xc = torch.randn(3, 16, 192) + torch.randn(192)  # (N, T, K)
    x = torch.cat([xc, xc + 0.1 * torch.randn(3, 16, 192)])  # (2N, T, K): halves close, as in CFG
    lin = nn.Linear(192, 96)
    q = QuantLinear(lin, QConfig(4, range="mse"), QConfig(4), **layer_kw(kw))
    with torch.no_grad():
        iq = integer.to_integer(q)
        own, exact = iq(x), lin(x)
        q.cfg_pair = iq.cfg_pair = True
        y, y_sim = iq(x), q(x)
    torch.testing.assert_close(y, y_sim, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[:3], own[:3])
    d = lambda v: v[3:] - v[:3]
    assert (d(y) - d(exact)).norm() < 0.2 * (d(own) - d(exact)).norm()


def test_cfg_on_the_shipped_model_lowers_the_guided_error_and_leaves_plain_forwards_alone():
    """forward_with_cfg raises every layer's cfg_pair for its forward only; the guided ε of the
    integer W4A4 model comes much closer to FP's than with each half coded on its own."""
    import copy
    fp = dit.load_checkpoint(dit.DEFAULT_CKPT)[0]
    iq = copy.deepcopy(fp)
    quant.quantize_model(iq, quant.Recipe("hadanorm", QConfig(4), QConfig(4), center="dynamic",
                                          hadamard="double"))
    integer.to_integer(iq)
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)
    t = torch.tensor([150, 150, 500, 500, 850, 850])
    y = torch.arange(6)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    layers = [m for m in iq.modules() if isinstance(m, integer.IntLinear)]

    def guided(m, delta):
        for layer in layers:
            layer.cfg_delta = delta
        with torch.no_grad():
            return m.forward_with_cfg(xx, tt, yy, 4.0, None)[:6]
    ref = guided(fp, True)
    err = lambda v: ((v - ref).norm() / ref.norm()).item()
    assert err(guided(iq, True)) < 0.7 * err(guided(iq, False))  # measured 0.37x
    assert len(layers) == 24 and not any(m.cfg_pair for m in layers)
    with torch.no_grad():  # a plain forward codes each half on its own
        plain = iq(xx, tt, yy)
        for layer in layers:
            layer.cfg_pair = layer.cfg_delta = True
        assert not torch.equal(iq(xx, tt, yy), plain)


def test_cfg_delta_follows_the_environment_and_refuses_other_values(monkeypatch):
    monkeypatch.setenv("DIT4BIT_CFG_DELTA", "off")
    q = QuantLinear(nn.Linear(64, 32), QConfig(4), QConfig(4))
    assert not q.cfg_delta and not integer.to_integer(q).cfg_delta
    monkeypatch.setenv("DIT4BIT_CFG_DELTA", "yes")
    with pytest.raises(ValueError, match="choose on or off"):
        QuantLinear(nn.Linear(64, 32), QConfig(4), QConfig(4))
