"""evaluate.py: the metrics against closed forms, and the shipped classifier file."""
import pytest
import torch

import evaluate
import sample


def test_frechet_distance_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    fd = evaluate.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    want = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()  # diagonal case
    assert abs(fd - want.item()) < 1e-9
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # rotation-invariant
    s = q @ torch.diag(a) @ q.T
    assert abs(evaluate.frechet_distance(mu1, s, mu1, s)) < 1e-9


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert evaluate.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(200, 8, generator=g) + 100
    assert evaluate.precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(200, 1) + 1e-3 * torch.randn(200, 8, generator=g)  # mode collapse
    p, r = evaluate.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1


def test_psnr_known_value():
    a = torch.zeros(2, 1, 4, 4)
    assert abs(sample.psnr(a, a + 0.2) - 20.0) < 1e-4  # error 0.1 on the [0, 1] scale -> 20 dB


def test_score_on_a_random_classifier():
    torch.manual_seed(0)
    clf = evaluate.Classifier().eval()
    x, y = torch.rand(20, 1, 32, 32) * 2 - 1, torch.arange(20) % 10
    f, _ = evaluate.features_and_logits(clf, x)
    ref = {"mu": f.mean(0), "sigma": torch.cov(f.T), "feats": f.half()}
    m = evaluate.score(x, y, clf, ref, ref_images=x)
    assert abs(m["fd"]) < 1e-3 and m["n"] == 20 and m["psnr"] > 90 and 0 <= m["acc"] <= 1
    assert m["pair"] == 0


def test_paired_distance_pairs_sample_i_with_reference_i():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 8, generator=g, dtype=torch.float64)
    moved = ref + torch.tensor([3.0, 4.0] + [0.0] * 6, dtype=torch.float64)  # every pair 5 apart
    assert abs(evaluate.paired_distance(moved, ref) - 5.0) < 1e-9
    assert evaluate.paired_distance(ref, ref) == 0
    # the same set in another order is far from its pairs (a set metric such as FD would say 0)
    assert evaluate.paired_distance(ref.flip(0), ref) > 2
    assert abs(evaluate.fd_of(ref.flip(0), {"mu": ref.mean(0), "sigma": torch.cov(ref.T)})) < 1e-9


def test_shipped_classifier_and_reference_statistics():
    clf, ref, acc = evaluate.load_classifier()
    assert acc >= 0.90
    assert ref["feats"].shape == (10000, 128) and ref["sigma"].shape == (128, 128)
    torch.testing.assert_close(ref["mu"], ref["feats"].double().mean(0), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_two_process_torchrun_scores_like_one_process(tiny_ckpt):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = {}
    for name, cmd in {"one": [sys.executable, "evaluate.py"],
                      "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2",
                              "evaluate.py"]}.items():
        r = subprocess.run(cmd + ["fp", "--ckpt", tiny_ckpt, "--samples", "6", "--steps", "2"],
                           cwd=root, capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rows[name] = [line for line in r.stdout.splitlines() if line.startswith("| DiT-T/4")]
    assert len(rows["one"]) == 1 and rows["one"] == rows["two"]  # same samples, same metrics


def test_budget_plot_takes_the_method_and_its_a8_rows_only(tmp_path):
    head = "| model | path | CFG | n | FD ↓ (± s.e.) | acc |\n|---|---|---|---|---|---|\n"
    rows = [("FP32", "94.00 ± 4.95"), ("W4A4 hadanorm+a8:0.2 (b.pt)", "98.00 ± 4.00"),
            ("W4A4 hadanorm (a.pt)", "110.00 ± 4.00"), ("W4A3 hadanorm (c.pt)", "180.00 ± 4.00"),
            ("W4A4 hadanorm+a8", "101.00 ± 4.00"), ("W4A4 svdquant (d.pt)", "120.00 ± 4.00")]
    t = tmp_path / "t.md"
    t.write_text(head + "".join(f"| {n} | integer | 4 | 1000 | {fd} | 90 |\n" for n, fd in rows))
    pts = evaluate.plot_budget([str(t)], str(tmp_path / "p.png"))
    assert [(b, fd) for b, fd, _, _ in pts] == [(0.0, 110.0), (0.1, 101.0), (0.2, 98.0)]
    assert (tmp_path / "p.png").stat().st_size > 1000
    t.write_text(head + "| W4A4 hadanorm (a.pt) | integer | 4 | 1000 | 110.00 ± 4.00 | 90 |\n")
    with pytest.raises(ValueError, match="no FP row"):
        evaluate.plot_budget([str(t)], str(tmp_path / "q.png"))
