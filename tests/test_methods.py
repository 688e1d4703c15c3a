"""Tests that see each method's idea, not only that the code runs: hand-computed values and
constructed cases whose right answer is known, so that a plausible wrong implementation fails (see
tests/wrong_answers.json and `python assignments.py --check`)."""
import torch

import calibrate
import hadamard
import quant
from quant import QConfig, QuantLinear


def test_smooth_scale_hand_values():
    # s_j = max|x_j|^α / max|W_:,j|^(1-α): at α = 0.5, √(4/1), √(1/4), √(9/9)
    act_max = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([[1.0, -4.0, 2.0], [-0.5, 1.0, -9.0]])
    torch.testing.assert_close(calibrate.smooth_scale(act_max, w, 0.5),
                               torch.tensor([2.0, 0.5, 1.0]))
    # α = 1: the activation maxima alone; α = 0: one over the weight maxima
    torch.testing.assert_close(calibrate.smooth_scale(act_max, w, 1.0), act_max)
    torch.testing.assert_close(calibrate.smooth_scale(act_max, w, 0.0),
                               torch.tensor([1.0, 0.25, 1 / 9]))


def outlier_layer():
    """64 -> 32 with three activation-outlier channels (x30) whose weights are small (x0.03): strong
    smoothing (α near 1) moves the outliers into the weights, where they cost little."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data = torch.randn(32, 64, generator=g) * 0.1
    lin.weight.data[:, :3] *= 0.03
    x = torch.randn(256, 64, generator=g)
    x[:, :3] *= 30
    return lin, x


def test_ditas_alpha_search_finds_the_known_best_alpha():
    lin, x = outlier_layer()
    err, a, s = calibrate.search_alpha(lin, x.abs().amax(0), x, QConfig(4), QConfig(4))
    assert a is not None and a >= 0.85, a  # this layer's best is α = 0.95
    # the scales come from the quantized weight
    wq_w = quant.fake_quant(lin.weight.detach(), QConfig(4))
    err_at = lambda a: calibrate.layer_mse(lin,
                                           dict(wq=QConfig(4), aq=QConfig(4),
                                                channel_scale=calibrate.smooth_scale(
        x.abs().amax(0), wq_w, a)), x, lin(x))
    assert err <= min(err_at(a) for a in (0.0, 0.5, 0.9, 1.0)) + 1e-9
    assert err < 0.1 * err_at(0.5), (err, err_at(0.5))  # measured: 0.017 against 0.54 at α = 0.5


def test_ditas_alpha_search_can_choose_no_smoothing():
    # weights already on the 4-bit grid, activations unquantized: s = 1 is exact, every α is not
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(32, 16, bias=False)
    codes = torch.randint(-7, 8, (16, 32), generator=g).float()
    codes[:, 0], codes[:, 1] = 7, -7  # each row spans ±7 steps: its min-max step is exactly 0.05
    lin.weight.data = codes * 0.05
    x = torch.randn(64, 32, generator=g) * torch.linspace(0.1, 10, 32)
    err, a, s = calibrate.search_alpha(lin, x.abs().amax(0), x, QConfig(4), None)
    assert a is None and err < 1e-12 and torch.equal(s, torch.ones(32))


def test_lowrank_lora_alternation_keeps_lowering_the_error_over_its_iterations():
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 256)
    lin.weight.data += 0.3 * torch.randn(256, 4) @ torch.randn(4, 192) / 4
    q = QuantLinear(lin, QConfig(4), None)
    plain = (q.weight - q.qweight()).norm().item()  # no LoRA
    errs = calibrate.lora_correct(q, rank=8, iters=10)
    # later alternations help beyond the first
    assert len(errs) == 10 and errs[-1] < errs[0] - 1e-3 < plain
    assert q.lora_u.shape == (256, 8) and q.lora_v.shape == (8, 192)


def test_lowrank_svdquant_branch_takes_the_top_singular_part_out_of_the_quantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64)
    # a strong rank-2 part: outliers in W
    lin.weight.data += torch.randn(64, 2) @ torch.randn(2, 96)
    q = QuantLinear(lin, QConfig(4), None)
    W = q.weight.detach().clone()
    rtn = (W - q.qweight()).norm().item()
    share, peak = calibrate.lowrank_branch(q, 2)
    S = torch.linalg.svdvals(W)
    assert abs(share - (S[:2] ** 2).sum().item() / (S ** 2).sum().item()) < 1e-5 and share > 0.8
    L = q.lora_u @ q.lora_v
    # the branch is what was taken out
    torch.testing.assert_close(L, W - q.weight, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(L).item() == 2
    assert abs(torch.linalg.svdvals(L)[0].item() - S[0].item()) < 1e-3 * S[0].item()
    assert (W - q.qweight() - L).norm().item() < 0.5 * rtn and peak < 0.8


def branch_layer(seed):
    """96 -> 64: a strong rank-2 part plus noise, and its inputs."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(96, 64)
    lin.weight.data = torch.randn(64, 96, generator=g) * 0.1 + \
        0.3 * torch.randn(64, 2, generator=g) @ torch.randn(2, 96, generator=g)
    return lin, torch.randn(128, 96, generator=g)


def test_lowrank_refined_svdquant_branch_fits_what_the_4bit_residual_missed():
    lin, x = branch_layer(0)
    q = QuantLinear(lin, QConfig(4), QConfig(4), "dynamic", None, "double")
    W = q.weight.detach().clone()
    (share, peak), errs = calibrate.refine_branch(q, 4, 6, x)
    # round 1 is the plain branch; later rounds fit W̃ − Q and lower the layer's output error
    plain = QuantLinear(lin, QConfig(4), QConfig(4), "dynamic", None, "double")
    calibrate.lowrank_branch(plain, 4)
    with torch.no_grad():
        assert abs(errs[0] - (plain(x) - lin(x)).pow(2).mean().item()) < 1e-5 * errs[0]
        kept = (q(x) - lin(x)).pow(2).mean().item()
    assert len(errs) == 6 and min(errs) < 0.95 * errs[0], errs  # measured: 0.86x
    assert abs(kept - min(errs)) < 1e-5 * kept  # the best round is the one kept
    # still an exact split of W̃ into residual + rank-4 branch
    torch.testing.assert_close(q.weight + q.lora_u @ q.lora_v, W, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(q.lora_u @ q.lora_v).item() == 4 and 0 < share < 1


def test_svdquant_alpha_search_scores_each_alpha_with_its_branch_and_quantizers():
    lin, x = outlier_layer()
    spec = dict(center="none", hadamard="none")
    err, a, s = calibrate.search_branch_alpha(lin, spec, x.abs().amax(0), x, QConfig(4), QConfig(4), 2)

    def err_at(alpha):  # the layer as apply_recipe builds it at this α
        q = QuantLinear(lin, QConfig(4), QConfig(4), channel_scale=calibrate.smooth_scale(
            x.abs().amax(0), lin.weight, alpha))
        calibrate.lowrank_branch(q, 2)
        with torch.no_grad():
            return (q(x) - lin(x)).pow(2).mean().item()
    assert abs(err - err_at(a)) < 1e-6 * err  # the score is that of the layer that will run
    assert err <= min(err_at(b / 10) for b in range(11)) * (1 + 1e-6)
    assert a != 0.5 and err < err_at(0.5), (a, err, err_at(0.5))  # measured: α 0.7, 0.93x the error


def test_int4_pack_bytes_hold_even_k_in_the_low_nibble():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    # -2 = 0xE high, 1 low; -8 = 0x8 high, 7 low
    assert quant.pack_int4(q).tolist() == [[0xE1, 0x87]]
    assert quant.unpack_int4(torch.tensor([[0xE1, 0x87]], dtype=torch.uint8)).tolist() == q.tolist()


def test_paley_matrix_follows_the_stored_convention():
    # shipped checkpoints were rotated with this matrix: first row +1, first column -1 below it, I +
    # S
    H = hadamard.base_matrix(12)
    assert (H[0] == 1).all() and (H[1:, 0] == -1).all() and (torch.diagonal(H) == 1).all()
    S = H - torch.eye(12, dtype=H.dtype)
    torch.testing.assert_close(S, -S.T)  # Paley I: skew-symmetric core
