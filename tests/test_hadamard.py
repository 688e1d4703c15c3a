"""hadamard.py: orthogonality and fast == dense for every DiT width, inverses, blocks, signs."""
import pytest
import torch

import hadamard

DIT_WIDTHS = [64, 72, 192, 384, 768, 1024, 1152, 1536, 3072, 4096, 4608]


@pytest.mark.parametrize("n", DIT_WIDTHS)
def test_fast_hadamard_is_orthogonal_and_equals_dense(n):
    H = hadamard.hadamard_matrix(n)  # float32
    assert (H @ H.T - torch.eye(n)).abs().max() < 1e-5
    x = torch.randn(2, 3, n)  # any leading shape
    torch.testing.assert_close(hadamard.transform(x), x @ H.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard.transform(x, inverse=True), x @ H, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 4, 12, 20, 28, 36, 60, 108])
def test_base_orders_are_plus_minus_one_hadamard(K):
    H = hadamard.base_matrix(K)
    assert H is not None and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64))


def test_paley_matrices_are_not_all_symmetric_so_inverse_is_the_transpose():
    H = hadamard.base_matrix(12)  # Paley I: I + skew
    assert not torch.equal(H, H.T)
    x = torch.randn(5, 12 * 8)
    torch.testing.assert_close(hadamard.transform(hadamard.transform(x), inverse=True), x,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(hadamard.transform(hadamard.transform(x, inverse=True)), x,
                               atol=1e-5, rtol=0)


def test_bf16_transform_is_close():
    x = torch.randn(4, 192)
    y = hadamard.transform(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), hadamard.transform(x), atol=0.05, rtol=0.02)


def test_fast_hadamard_block_diagonal_and_random_signs():
    x = torch.randn(3, 192)
    Hb = hadamard.hadamard_matrix(64)
    want = (x.view(3, 3, 64) @ Hb.T).view(3, 192)
    torch.testing.assert_close(hadamard.transform(x, block=64), want, atol=1e-5, rtol=0)
    s = hadamard.random_signs(192, seed=1)
    assert set(s.tolist()) == {-1.0, 1.0}
    y = hadamard.transform(x, signs=s)
    torch.testing.assert_close(y, (x * s) @ hadamard.hadamard_matrix(192).T, atol=1e-5, rtol=0)
    torch.testing.assert_close(hadamard.transform(y, inverse=True, signs=s), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not divide"):
        hadamard.transform(x, block=100)


def test_unsupported_size_names_the_block_fallback():
    with pytest.raises(ValueError, match="block-diagonal.*block=2"):
        hadamard.transform(torch.randn(2, 10))
    with pytest.raises(ValueError, match="block=8"):
        hadamard.hadamard_matrix(184)  # 184 = 92·2: no Paley construction for 92 (needs Williamson)


def test_hadamard_spreads_an_outlier_channel():
    x = torch.randn(256, 192)
    x[:, 7] *= 50
    y = hadamard.transform(x)
    ratio = lambda v: (v.abs().amax(-1) / v.pow(2).mean(-1).sqrt()).mean()
    assert ratio(y) < ratio(x) / 3  # the outlier's energy is spread over all channels
    torch.testing.assert_close(y.pow(2).sum(-1), x.pow(2).sum(-1), rtol=1e-4, atol=0)  # orthogonal


def test_lesson_shows_the_outliers_spread():
    from conftest import lesson_output
    rows = {l.split()[0]: [float(v) for v in l.split()[1:]] for l in lesson_output("hadamard.py").splitlines()
            if l.split() and l.split()[0] in ("raw", "Hadamard")}
    # max/RMS: the outliers are spread over all channels
    assert rows["Hadamard"][0] < rows["raw"][0] / 3
    assert rows["Hadamard"][2] < rows["raw"][2]  # and the 4-bit error drops
