"""integer.py: IntLinear gives the simulation's codes and exactly the output its codes imply, no
float weight is kept, HQ-DM's integer weight is exact, the GEMM is torch._int_mm on int8
operands."""
import pytest
import torch
import torch.nn as nn

import dit
import hadamard
import integer
import quant
from quant import QConfig, QuantLinear
from test_kernels import KERNEL, assert_codes_match_up_to_ties



def sim_codes(q, x):
    """The simulated layer's activation codes and unrounded values x̃ / step, (M, K) each."""
    xt, _ = q.transform_input(x)
    step = q.act_step(xt) if (q.a_scale is not None or q.a_clip is not None) else \
        quant.quant_params(xt, q.aq)[0]
    v = xt / step
    lo, hi = quant.levels(q.aq)
    return torch.clamp(v.round(), lo, hi).to(torch.int8).reshape(-1, q.in_features), v.reshape(-1, q.in_features)


def check_integer_layer(q, x, kernel, gemm="auto"):
    """q (a QuantLinear) -> its IntLinear: the same codes as the simulation (up to rounding ties on
    the C kernel), the output its codes give exactly, and (torch path) the simulation's output."""
    if kernel and not KERNEL:
        pytest.skip("C kernel unavailable")
    y_sim, w_sim = q(x), q.qweight().detach()
    codes_sim, v = sim_codes(q, x)
    t_bucket = q.t_bucket
    iq = integer.to_integer(q, gemm)
    assert gemm == "auto" or iq.gemm == gemm
    iq.use_kernel, iq.t_bucket = kernel, t_bucket
    N, K = iq.out_features, iq.in_features
    assert isinstance(iq, integer.IntLinear) and not hasattr(iq, "weight")
    assert iq.w_int.dtype == (torch.uint8 if iq.w_bits <= 4 else torch.int8)
    floats = [t for t in list(iq.buffers()) if t.is_floating_point()]
    assert all(t.numel() < N * K for t in floats), "a float copy of the weight is kept"
    codes = quant.unpack_int4(iq.w_int) if iq.w_bits <= 4 else iq.w_int
    torch.testing.assert_close(codes.float() * iq.w_scale, w_sim, atol=1e-6, rtol=0)
    tokens = x.shape[-2]
    q_int, st, mu_t, lr = iq.quantize_input(x.reshape(-1, K), tokens)
    # oneDNN's codes are stored + 128
    q_int = (q_int.to(torch.int16) - iq.offset_codes).to(torch.int8)
    if kernel:
        assert_codes_match_up_to_ties(q_int[:, :K], codes_sim, v)
    else:
        assert torch.equal(q_int[:, :K], codes_sim)  # the very same integers
    y = iq(x)
    # what these codes must give, in float64: the integer GEMM leaves nothing but the scales to
    # round
    R = iq.w_codes.double() if not iq.single else \
        hadamard.transform(codes.double(), block=iq.block, signs=iq.signs) * (iq.block or K) ** 0.5
    Rw = R[:N] if iq.dup16 or iq.single else R
    acc = q_int[:, :K].double() @ Rw.T
    ref = (acc * st.double() * iq.w_scale_eff.double()).view(-1, tokens, N)
    off = iq.offset(mu_t)
    ref = (ref + off.double().unsqueeze(1)) if off is not None else ref
    if lr is not None:
        ref = ref + (lr.double() @ iq.lora_ut.double()).view(ref.shape)
    torch.testing.assert_close(y, ref.float().view(y.shape), rtol=1e-5, atol=1e-5)
    if not kernel:
        torch.testing.assert_close(y, y_sim, atol=1e-5, rtol=1e-5)
    return iq


@pytest.mark.parametrize("kernel,gemm", [(False, "int_mm"), (True, "int_mm"), (True, "onednn")])
@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("kw",
                         [dict(), dict(hadamard="double"),
                          dict(hadamard="double", center="dynamic", channel_scale="s"),
                          dict(hadamard="double", center="static", signs="r")])
def test_integer_layer_equals_simulation(bits, kw, kernel, gemm):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    kw = dict(kw)
    if kw.get("channel_scale") == "s":
        kw["channel_scale"] = torch.rand(192) + 0.5
    if kw.get("signs") == "r":
        kw["signs"] = hadamard.random_signs(192, 3)
    if kw.get("center") == "static":
        kw["static_mean"] = torch.randn(192)
    with torch.no_grad():
        check_integer_layer(QuantLinear(lin, QConfig(bits[0], range="mse"), QConfig(bits[1]), **kw),
                            x, kernel, gemm)


def test_integer_layer_multiplies_int8_codes_with_int_mm(monkeypatch):
    """The 4-bit path is real: its products are torch._int_mm calls on int8 operands."""
    calls = []
    real = torch._int_mm

    def spy(a, b):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b)
    monkeypatch.setattr(torch, "_int_mm", spy)
    torch.manual_seed(0)
    q = integer.IntLinear(QuantLinear(nn.Linear(192, 96), QConfig(4), QConfig(4), hadamard="double",
                                      center="dynamic"), "int_mm")
    with torch.no_grad():
        q(torch.randn(2, 16, 192))
    assert calls == [(torch.int8, torch.int8, (32, 192), (192, 96))]


def test_integer_path_refuses_unsupported_quantizers():
    q = QuantLinear(nn.Linear(64, 32), QConfig(4, granularity="group", group_size=32), QConfig(4))
    with pytest.raises(ValueError, match="integer path"):
        integer.to_integer(q)


# --- static, per-timestep activation scales ------------------------------------------------------

@pytest.mark.parametrize("kernel", [False, True])
def test_static_per_timestep_scales_follow_each_samples_timestep(kernel):
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
        check_integer_layer(q, torch.randn(2, 64, 768), kernel)
        integer.to_integer(m)
        m(x, torch.tensor([10, 900]), y)
        # the integer layers get their buckets too
        assert m.blocks[0].mlp.fc2.t_bucket.tolist() == [0, 3]


# --- HQ-DM single Hadamard -----------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("block", [None, 64, 32])
@pytest.mark.parametrize("abits", [4, 3, 8])
def test_single_hadamard_is_exact_and_its_integer_form_matches(block, abits, kernel):
    torch.manual_seed(0)
    lin = nn.Linear(192, 96)
    x = torch.randn(2, 16, 192) + torch.randn(192)
    q = QuantLinear(lin, QConfig(4, range="mse"), QConfig(abits), hadamard="single",
                    block=block)
    torch.testing.assert_close(q.weight, lin.weight)  # the weight is NOT rotated
    q.quantize_enabled = False
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)
    q.quantize_enabled = True
    with torch.no_grad():
        iq = check_integer_layer(q, x, kernel)
    codes = quant.unpack_int4(iq.w_int).double()
    # exact integers
    R = (hadamard.transform(codes, block=block) * (block or 192) ** 0.5).round().long()
    D = iq.w_codes.long()
    if abits <= 4:  # one GEMM of width 2K: R = d0 + 16 d1
        assert iq.dup16 and D.shape == (96, 384)
        assert torch.equal(D[:, :192] + 16 * D[:, 192:], R) and D[:, :192].abs().max() <= 8
    else:  # base-128 digits stacked along N
        assert not iq.dup16 and D.shape[0] == 96 * iq.digits
        assert torch.equal(sum(D[p * 96:(p + 1) * 96] * 128 ** p for p in range(iq.digits)), R)


@pytest.mark.parametrize("k,abits,wide", [(192, 4, False), (192, 8, False), (4608, 8, True)])
def test_single_matmul_is_exact_in_int32_and_where_int32_could_overflow(k, abits, wide):
    torch.manual_seed(0)
    lin = nn.Linear(k, 8)
    # a constant row: H concentrates it into one entry of 7·K, the largest |R| can be
    lin.weight.data[0] = 0.1
    q = integer.to_integer(QuantLinear(lin, QConfig(4), QConfig(abits), hadamard="single"))
    codes = quant.unpack_int4(q.w_int).double()
    R = (hadamard.transform(codes) * k ** 0.5).round().long()  # (8, K)
    lo = -(2 ** (abits - 1))
    xq = torch.randint(lo, -lo, (5, k), dtype=torch.int8)
    xq[0] = torch.where(R[0] >= 0, -lo - 1, lo).to(torch.int8)  # near the worst case for row 0
    got = q.matmul(torch.cat([xq, 16 * xq], 1) if q.dup16 else xq)
    assert q.wide is wide
    assert torch.equal(got.long(), xq.long() @ R.T)


# DiT-XL/2 fc1 and fc2: 36·32 and 36·128
@pytest.mark.parametrize("k,n", [(1152, 4608), (4608, 1152)])
def test_xl_width_hadanorm_integer_path_equals_simulation(k, n):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(2, 8, k) + torch.randn(k)
    q = QuantLinear(lin, QConfig(4), QConfig(4), center="dynamic", channel_scale=torch.rand(k) + 0.5,
                    hadamard="double")
    with torch.no_grad():
        check_integer_layer(q, x, KERNEL)




@pytest.mark.skipif(not KERNEL, reason="C kernel unavailable")
@pytest.mark.parametrize("method", ["hadanorm", "svdquant-hadanorm"])
def test_fused_mlp_equals_fc1_gelu_fc2(method):
    """IntMlp's one C pass (fc1's accumulator -> GELU -> fc2's codes, low-rank branches included)
    gives what fc1, GELU and fc2 give one after the other."""
    import calibrate
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=1).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    calibrate.quantize_fp(m, method, 4, 4, calib_n=2, calib_steps=3)
    integer.to_integer(m)
    mlp = m.blocks[0].mlp
    assert isinstance(mlp, integer.IntMlp) and (mlp.fc1.lora_vt is not None) == method.startswith("svdquant")
    x = torch.randn(4, 64, 192) + torch.randn(192)
    with torch.no_grad():
        fused = mlp(x)
        unfused = mlp.fc2(mlp.act(mlp.fc1(x)))  # the same layers, through a float GELU activation
    rel = (fused - unfused).abs() / unfused.abs().max()
    # equal but for a code on a rounding tie
    assert rel.max() < 2e-2 and (rel > 1e-4).float().mean() < 1e-2
