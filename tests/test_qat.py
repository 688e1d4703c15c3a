"""qat.py: LSQ/STE gradients, the training batches and loss, per-band metric, what learns when,
the EMA, exact resume, integer == sim, the CLIs."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import save_random_tiny

import calibrate
import dit
import integer
import qat
import quant
from diffusion import Diffusion
from quant import QConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def teacher(tmp_path):
    # larger outputs: a measurable loss
    return save_random_tiny(str(tmp_path / "teacher.pt"), std=0.1)


def test_lsq_step_gradient_is_the_ste_formula_and_matches_finite_differences_when_clipped():
    cfg = QConfig(4, granularity="tensor")
    x = torch.tensor([-3.0, -0.37, 0.12, 0.5, 0.81, 2.9])
    s = torch.tensor(0.2, requires_grad=True)
    g_s = torch.autograd.grad(quant.fake_quant_with(x, s, 0.0, cfg).sum(), s)[0]
    v = x / s.detach()
    inside = (v.round() >= -8) & (v.round() <= 7)
    # LSQ: round(x/s) - x/s, or the clamp level
    want = torch.where(inside, v.round() - v, v.round().clamp(-8, 7)).sum()
    torch.testing.assert_close(g_s, want)
    eps = 1e-4  # where every element is clipped, the function is linear in s: FD must agree
    xc = torch.tensor([-3.0, 2.9, 5.0])
    f = lambda sv: quant.fake_quant_with(xc, torch.tensor(sv), 0.0, cfg).sum().item()
    sc = torch.tensor(0.2, requires_grad=True)
    auto = torch.autograd.grad(quant.fake_quant_with(xc, sc, 0.0, cfg).sum(), sc)[0].item()
    assert abs(auto - (f(0.2 + eps) - f(0.2 - eps)) / (2 * eps)) < 1e-2
    xg = torch.tensor([0.33, -0.61], requires_grad=True)  # STE: d/dx = 1 inside the range
    assert torch.equal(torch.autograd.grad(quant.fake_quant_with(xg, s.detach(), 0.0, cfg).sum(), xg)[0], torch.ones(2))


def test_clip_ratio_gradient_reaches_each_bucket_and_matches_finite_differences_when_clipped():
    """Per-token steps r_b · max|x̃| / qmax: with every element at its token's max and r < 1 all
    codes clip, so the layer is linear in r and the LSQ gradient must equal the finite
    difference."""
    torch.manual_seed(0)
    q = quant.QuantLinear(torch.nn.Linear(8, 4), QConfig(4), QConfig(4, clip=True, buckets=3))
    q.a_clip = torch.nn.Parameter(torch.tensor([0.5, 0.6, 0.7]))
    q.t_bucket = torch.tensor([0, 2])  # the middle bucket gets no sample: no gradient
    # (N, T, K): |x| constant along each token
    x = torch.sign(torch.randn(2, 3, 8)) * torch.rand(2, 3, 1)
    f = lambda: q(x).sum()
    auto = torch.autograd.grad(f(), q.a_clip)[0]
    assert auto[1] == 0 and auto[0] != 0 and auto[2] != 0
    eps, fd = 1e-3, []
    with torch.no_grad():
        for b in range(3):
            q.a_clip[b] += eps
            up = f().item()
            q.a_clip[b] -= 2 * eps
            fd.append((up - f().item()) / (2 * eps))
            q.a_clip[b] += eps
    torch.testing.assert_close(auto, torch.tensor(fd), rtol=1e-2, atol=1e-3)


def perturbed(model, scale=0.01, seed=0):
    """The model with its quantizers off and its weights moved: differs from the teacher by a
    known, quantizer-free amount, so sums must agree to float rounding."""
    g = torch.Generator().manual_seed(seed)
    quant.set_quantization(model, False)
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, quant.QuantLinear):
                q.weight += scale * torch.randn(q.weight.shape, generator=g)
    return model


def test_noised_batches_are_fresh_never_at_t0_and_drop_a_tenth_of_the_labels():
    diffusion, g = Diffusion.make(), torch.Generator().manual_seed(0)
    x0, y = torch.rand(4000, 1, 2, 2), torch.arange(4000) % 10
    x, t, yy = qat.noised_batch(x0, y, g, diffusion, 10, null_p=0.1)
    assert t.min() == 1 and t.max() == 999  # uniform over 1..999: t = 0 never trained on
    assert 0.08 < (yy == 10).float().mean() < 0.12 and torch.equal(yy[yy != 10], y[yy != 10])
    noise = (x - diffusion._at(diffusion.sqrt_alphas_cumprod, t, x0) * x0) / \
        diffusion._at(diffusion.sqrt_one_minus_alphas_cumprod, t, x0)
    assert abs(noise.std() - 1) < 0.05  # x_t = q_sample(x0, t, ε), ε ~ N(0, 1)
    x2, t2, _ = qat.noised_batch(x0, y, g, diffusion, 10)
    assert not torch.equal(t, t2) and not torch.allclose(x, x2)  # fresh every call


def test_trajectory_pool_holds_the_samplers_states_without_t0(teacher):
    from diffusion import sample_states
    fp, _ = dit.load_checkpoint(teacher)
    x, t, y = qat.trajectory_pool(fp, 10, steps=5, cfg_scale=4.0, seed=3)
    assert len(x) == len(t) == len(y) == 40 and t.min() > 0  # 4 of the 5 DDIM steps: t = 0 out
    assert sorted(set(y.tolist())) == list(range(10))
    want = sample_states(fp, 10, 5, 4.0, seed=3)[1]  # the second DDIM state, exactly
    assert torch.equal(x[10:20], want[0]) and torch.equal(t[10:20], want[1])


def test_loss_sees_errors_the_guided_output_cancels_and_weighs_the_difference():
    torch.manual_seed(0)
    ec, eu, v = torch.randn(3, 2, 1, 4, 4).unbind(0)
    s = 4.0
    # errors with s e_c = (s - 1) e_u: the guided output e_u + s (e_c - e_u) is exact
    qc, qu = ec + (s - 1) * v, eu + s * v
    assert ((qu - eu) + s * ((qc - ec) - (qu - eu))).abs().max() < 1e-5
    got = qat.per_sample_error(qc, qu, ec, eu, (s - 1) ** 2)
    want = ((s - 1) ** 2 + s ** 2 + (s - 1) ** 2 * 1) * v.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, want)
    # equal errors of both halves (guidance cancels them): no difference term
    torch.testing.assert_close(qat.per_sample_error(ec + v, eu + v, ec, eu, 9.0),
                               2 * v.pow(2).flatten(1).mean(1))


def test_qat_loss_weighs_each_sample_by_its_timestep_band(teacher):
    fp, _ = dit.load_checkpoint(teacher)
    model = perturbed(qat.prepare(fp, 4, 4, "double", init="plain")[0])
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 32, 32, generator=g), torch.tensor([5, 150, 420, 990]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        ec, eu = qat.both_halves(fp, x, t, y)
        qc, qu = qat.both_halves(model, x, t, y)
        each = qat.per_sample_error(qc, qu, ec, eu, 9.0)
        for b, i in ((0, 0), (1, 1), (4, 2), (9, 3)):
            w = torch.zeros(10)
            w[b] = 1.0
            got = qat.qat_loss(model, fp, (x, t, y), w, 9.0)
            torch.testing.assert_close(got, each[i] / 4)  # only the sample in band b counts


def test_both_halves_are_coded_as_the_sampler_codes_its_cfg_pair(teacher):
    """QAT's loss and score run both halves as a CFG pair (dit.cfg_pairs): their guided ε is the
    sampler's to float rounding, and differs from coding each half on its own."""
    fp, _ = dit.load_checkpoint(teacher)
    model = qat.prepare(fp, 4, 4, "double", init="plain")[0]  # quantizers on, per-token steps
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 1, 32, 32, generator=g), torch.tensor([5, 150, 420, 990]), torch.tensor([1, 2, 3, 4])
    from diffusion import guided
    with torch.no_grad():
        want = guided(model, y, 4.0, guide_channels=None)(x, t)  # (N, C, H, W)
        mix = lambda h: h[1] + 4.0 * (h[0] - h[1])
        torch.testing.assert_close(mix(qat.both_halves(model, x, t, y)), want, atol=1e-5, rtol=1e-5)
        quant.set_cfg_delta(model, False)
        own = mix(qat.both_halves(model, x, t, y))
    assert (own - want).abs().max() > 1e-3


def test_band_errors_are_the_guided_error_the_sampler_sees_per_band(teacher, fake_fmnist):
    fp, _ = dit.load_checkpoint(teacher)
    ho = qat.held_out(fp, n=3, seed=7, data_dir=fake_fmnist)
    x, t, y, ec, eu = ho
    assert len(x) == 30 and sorted(set(t.tolist())) == list(range(50, 1000, 100))  # t = 0 out
    model = perturbed(qat.prepare(fp, 4, 4, "double", init="plain")[0])
    guided_err, obj = qat.band_errors(model, ho, 4.0)
    with torch.no_grad():
        from diffusion import guided
        for band in (0, 6):
            i = (t // 100 == band).nonzero().flatten()
            out = guided(model, y[i], 4.0, guide_channels=None)(x[i], t[i])
            want = (out - (eu[i] + 4.0 * (ec[i] - eu[i]))).pow(2).mean()
            assert abs(guided_err[band] - want) <= 1e-4 * want
    assert torch.equal(qat.band_errors(fp, ho)[0], torch.zeros(10))  # the teacher scores 0
    x0, t0, y0, _, _ = qat.held_out(fp, n=3, seed=7, data_dir=fake_fmnist, at_t0=True)  # the diagnosis
    assert t0.tolist() == [0, 0, 0] and torch.equal(y0, y[::10])
    assert (obj > guided_err / 16).all()


def args(teacher, data_dir, run, iters, *extra):
    return qat.get_args(["train", "--ckpt", teacher, "--data-dir", data_dir, "--iters", str(iters),
                         "--batch-size", "4", "--eval-n", "2", "--state-dir", run,
                         "--ckpt-every", "2", "--lr", "1e-3", "--lr-scale", "1e-2", *extra])


def test_steps_learn_first_weights_from_weights_from_and_the_ema_is_what_comes_out(tmp_path, teacher, fake_fmnist):
    fp, _ = dit.load_checkpoint(teacher)
    start, _ = qat.prepare(fp, 4, 4, "single", init="svdquant-hadanorm")
    w0 = [p.clone() for q in start.modules() if isinstance(q, quant.QuantLinear) for p in qat.weights_of(q)]
    s0 = [p.clone() for q in start.modules() if isinstance(q, quant.QuantLinear) for p in qat.steps_of(q)]
    # weights and branch frozen until --weights-from; steps and clip ratios move from step 0
    steps_only, *_ = qat.train(args(teacher, fake_fmnist, str(tmp_path / "a"), 3, "--weights-from", "3"))
    w = [p for q in steps_only.modules() if isinstance(q, quant.QuantLinear) for p in qat.weights_of(q)]
    s = [p for q in steps_only.modules() if isinstance(q, quant.QuantLinear) for p in qat.steps_of(q)]
    assert len(w) == 3 * len(s) // 2 and all(torch.equal(a, b) for a, b in zip(w, w0))
    ws0 = [q.w_scale.clone() for q in start.modules() if isinstance(q, quant.QuantLinear)]
    ws = [q.w_scale for q in steps_only.modules() if isinstance(q, quant.QuantLinear)]
    assert all(torch.equal(a, b) for a, b in zip(ws, ws0))  # --lr-wstep 0: the PTQ weight steps stay
    assert sum(not torch.equal(a, b) for a, b in zip(s, s0)) >= len(s) // 2  # every clip ratio
    both, *_ = qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 3, "--weights-from", "1"))
    w = [p for q in both.modules() if isinstance(q, quant.QuantLinear) for p in qat.weights_of(q)]
    assert all(not torch.equal(a, b) for a, b in zip(w, w0))
    # what train returns (and exports) is the EMA, not the last iterate
    st = torch.load(str(tmp_path / "b" / "state.pt"), weights_only=False)
    assert all(torch.equal(e, p) for e, p in zip(st["ema"], qat.trained(both)))
    raw = copy.deepcopy(both)
    raw.load_state_dict(st["model"])
    assert any(not torch.equal(e, p) for e, p in zip(st["ema"], qat.trained(raw)))


def test_training_on_fp_trajectories_moves_the_steps_and_resumes_exactly(tmp_path, teacher, fake_fmnist):
    extra = ("--states", "trajectories", "--pool", "2")
    _, _, _, full = qat.train(args(teacher, fake_fmnist, str(tmp_path / "a"), 3, *extra))
    _, _, _, first = qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 3, *extra, "--stop-after", "1"))
    m, _, _, rest = qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 3, *extra, "--resume"))
    assert first + rest == full and len(full) == 3
    start, _ = qat.prepare(dit.load_checkpoint(teacher)[0], 4, 4, "single", init="svdquant-hadanorm")
    moved = [not torch.equal(a, b) for a, b in zip(qat.trained(m), qat.trained(start))]
    assert any(moved)


def test_resume_gives_the_same_losses_and_refuses_other_settings(tmp_path, teacher, fake_fmnist):
    _, _, _, full = qat.train(args(teacher, fake_fmnist, str(tmp_path / "a"), 4, "--weights-from", "1"))
    _, _, _, first = qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 4, "--weights-from", "1",
                                    "--stop-after", "2"))
    m, _, _, rest = qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 4, "--weights-from", "1",
                                   "--resume"))
    assert len(first) == 2 and first + rest == full  # generator, optimizer and EMA all resumed
    with pytest.raises(ValueError, match="other settings"):
        qat.train(args(teacher, fake_fmnist, str(tmp_path / "b"), 6, "--resume", "--abits", "3"))


def test_hadanorm_init_starts_at_the_ptq_model(teacher):
    """Step 0 of the double form is exactly the PTQ model calibrate.py makes with the same
    calibration; the single form (weights unrotated) is another model."""
    fp, _ = dit.load_checkpoint(teacher)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([40, 700]), torch.tensor([1, 2])
    ptq_model = dit.load_checkpoint(teacher)[0]
    ptq, _ = calibrate.quantize_fp(ptq_model, "svdquant-hadanorm", 4, 4, calib_n=2, calib_steps=4)
    double, rec = qat.prepare(fp, 4, 4, "double", calib_n=2, calib_steps=4, init="svdquant-hadanorm")
    single, _ = qat.prepare(fp, 4, 4, "single", calib_n=2, calib_steps=4, init="svdquant-hadanorm")
    assert rec.center == "dynamic" and all(torch.equal(ptq.scales[k], v) for k, v in rec.scales.items())
    with torch.no_grad():
        ref = ptq_model(x, t, y)
        torch.testing.assert_close(double(x, t, y), ref)
        assert not torch.allclose(single(x, t, y), ref, atol=1e-4)



@pytest.mark.parametrize("mode,act", [(m, "token") for m in qat.MODES] + [("single", "static")])
def test_qat_checkpoint_integer_path_equals_simulation(tmp_path, teacher, fake_fmnist, mode, act):
    model, recipe, cfg, _ = qat.train(args(teacher, fake_fmnist, str(tmp_path / mode), 2, "--hadamard", mode,
                                           "--act", act, "--weights-from", "1"))
    out = str(tmp_path / f"{mode}.pt")
    qat.export(model, recipe, cfg, out, {})
    loaded, _, rec = integer.load_quantized(out)
    assert rec.method == f"hqdm-{mode}" and rec.integer
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([40, 700]), torch.tensor([1, 2])
    ins = {}  # each layer's input in the simulated model
    hooks = [q.register_forward_pre_hook(lambda mod, inp, n=n: ins.__setitem__(n, inp[0]))
             for n, _, _, q in quant.quant_layers(model)]
    with torch.no_grad():
        sim, out_int = model(x, t, y), loaded(x, t, y)
        for h in hooks:
            h.remove()
        # layer by layer, on the same inputs and timestep buckets: equal to float rounding
        for (n, _, _, q), (_, _, _, iq) in zip(quant.quant_layers(model), quant.quant_layers(loaded)):
            iq.t_bucket = q.t_bucket
            ref = q(ins[n])
            assert ((iq(ins[n]) - ref).abs().max() / ref.abs().max()).item() < 1e-5, n
    # end to end a float-rounding difference can flip a 4-bit code on a tie, which attention spreads
    # over the sample (and the float parts were stored in fp16): close, not equal
    assert ((out_int - sim).abs().max() / sim.abs().max()).item() < 0.05


def test_bad_input_exit_2(teacher):
    from conftest import run_main
    r = run_main("qat.py", "train", "--ckpt", teacher, "--abits", "2", "--iters", "1")
    assert r.returncode == 2 and "unsupported bit width 2" in r.stderr and "Traceback" not in r.stderr
    r = run_main("qat.py", "train", "--ckpt", teacher, "--act", "tensor")
    assert r.returncode == 2 and "invalid choice: 'tensor'" in r.stderr


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path, teacher, fake_fmnist):
    import re
    runs = {"one": [sys.executable, "qat.py"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "qat.py"]}
    got = {}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + ["train", "--ckpt", teacher, "--iters", "3", "--data-dir", fake_fmnist,
                                  "--eval-n", "2", "--weights-from", "1", "--batch-size", "4",
                                  "--state-dir", str(tmp_path / name)], cwd=ROOT,
                                      capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r"loss (\S+) \(first \d+\) -> (\S+) \(last", r.stdout)
        got[name] = [float(m.group(1)), float(m.group(2))]
    assert len(got["one"]) == 2
    for a, b in zip(got["one"], got["two"]):
        assert abs(a - b) <= 1e-4 * abs(a)


@pytest.fixture
def silhouettes(tmp_path):
    """Fashion-MNIST-shaped files of flat bright shapes whose size follows the class: like garments
    on a black ground (uniform noise images are no test of a model trained on garments)."""
    import numpy as np
    import data
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        imgs = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            h, w = 8 + 2 * c, 20 - c
            top, left = (28 - h) // 2 + rng.integers(-2, 3), (28 - w) // 2 + rng.integers(-2, 3)
            imgs[i, top:top + h, left:left + w] = rng.integers(120, 255)
        img_f, lab_f = data.FILES[split]
        data.write_idx(str(tmp_path / img_f), imgs)
        data.write_idx(str(tmp_path / lab_f), labels)
    return str(tmp_path)


def test_lesson_error_goes_down(capsys, monkeypatch, silhouettes):
    from conftest import ROOT
    monkeypatch.chdir(ROOT)  # the lesson reads the shipped checkpoint
    qat.lesson(steps=20, n=8, data_dir=silhouettes)
    rel = [float(l.split()[-1]) for l in capsys.readouterr().out.splitlines() if l.strip().startswith("step")]
    assert rel[0] == 1.0 and len(rel) == 3 and rel[-1] < 0.99  # steps that do not learn: 1.000


def test_evaluate_table_and_qat_score_read_a_qat_checkpoint(tmp_path, teacher, fake_fmnist, capsys):
    import evaluate
    model, recipe, cfg, _ = qat.train(args(teacher, fake_fmnist, str(tmp_path / "r"), 1))
    out = str(tmp_path / "q.pt")
    qat.export(model, recipe, cfg, out, {})
    evaluate.main(["table", "--ckpt", teacher, "--n", "4", "--steps", "2", "--settings", "",
                   "--methods", "", "--data-dir", fake_fmnist,
                   "--qckpt", out, "--compile", "off"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    floor_fd = float(rows[1].split("|")[5].split("±")[0])
    assert rows[1].startswith("| real training images (the floor) | - | 0 | 4 |")
    assert rows[2].startswith("| FP32 | fp32 (eager) | 1.5 | 4 |")
    assert rows[3].startswith("| W4A4 hqdm-single (q.pt) | integer | 1.5 | 4 |")
    for r in rows[2:]:  # FD − floor beside FD
        c = r.split("|")
        assert abs(float(c[6]) - (float(c[5].split("±")[0]) - floor_fd)) < 0.02
    evaluate.main(["table", "--ckpt", teacher, "--n", "4", "--steps", "2", "--settings", "",
                   "--methods", "", "--no-floor", "--no-fp", "--qckpt", out, "--compile", "off"])
    again = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    cols, ref = again[1].split("|"), rows[3].split("|")
    assert len(again) == 2 and cols[:6] + cols[7:10] == ref[:6] + ref[7:10]  # same samples, no FP row
    assert cols[6] == cols[10] == cols[11] == " - "  # no floor, paired distance or PSNR
    qat.main(["score", out, "--ckpt", teacher, "--data-dir", fake_fmnist, "--eval-n", "3"])
    line = capsys.readouterr().out.splitlines()[-1]
    fp = dit.load_checkpoint(teacher)[0]
    want = qat.band_errors(integer.load_quantized(out)[0], qat.held_out(fp, 3, 7, fake_fmnist))[0]
    assert line == f"{out}: {qat.band_report(want, want)}"  # the CLI scores the loaded checkpoint
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.main(["table", "--ckpt", teacher, "--qckpt", str(tmp_path / "none.pt")])


def test_qat_score_runs_a_calibrate_file_on_the_integer_path(tmp_path, teacher, fake_fmnist, capsys):
    sim, ipath = str(tmp_path / "sim.pt"), str(tmp_path / "int.pt")
    calibrate.main(["--ckpt", teacher, "--method", "hadanorm", "--calib-n", "2", "--calib-steps", "2",
                    "--out", sim])  # the simulated form
    m, cfg, recipe = integer.load_quantized(sim)
    integer.to_integer(m)
    integer.save_quantized(ipath, m, cfg, recipe, {})
    capsys.readouterr()
    qat.main(["score", ipath, sim, "--ckpt", teacher, "--data-dir", fake_fmnist, "--eval-n", "3"])
    last = capsys.readouterr().out.splitlines()[-1]
    # the same codes, steps and error: both files score as the integer model
    assert last.endswith("relative to start 1.000; int4 codes changed 0.0%, weight steps 1.00-1.00x"), last


def test_screen_ranks_the_model_closer_to_fp_first(tmp_path, teacher, capsys):
    """W8A8 samples stay near FP's from the same noise, W4A3's do not: the screen must say so, on
    its own seed."""
    import evaluate
    paths = []
    for wbits, abits in ((4, 3), (8, 8)):
        model, cfg = dit.load_checkpoint(teacher)
        recipe, _ = calibrate.quantize_fp(model, "rtn", wbits, abits, calib_n=2, calib_steps=2)
        integer.to_integer(model)
        paths.append(str(tmp_path / f"w{wbits}a{abits}.pt"))
        integer.save_quantized(paths[-1], model, cfg, recipe, {})
    evaluate.main(["screen", *paths, "--ckpt", teacher, "--n", "8", "--steps", "4", "--compile", "off"])
    out = capsys.readouterr().out.splitlines()
    i = next(k for k, l in enumerate(out) if l.startswith("ranked by paired distance"))
    assert "seed 3" in out[i] and "CFG 4" in out[i]
    assert "w8a8.pt" in out[i + 1] and "w4a3.pt" in out[i + 2]
    d8, d3 = float(out[i + 1].split()[0]), float(out[i + 2].split()[0])
    assert 0 <= d8 < d3


def test_sample_defaults_to_the_qat_checkpoint_beside_the_fp_one_and_falls_back_to_ptq(tmp_path, teacher, fake_fmnist, capsys):
    import sample
    setting = "w4a4"
    wbits, abits = sample.SETTINGS[setting]
    tag, ptq = setting.upper(), sample.BEST_PTQ[setting]
    assert sample.BEST_METHOD[setting] == "hqdm"
    png = str(tmp_path / "s.png")
    plain = ["--ckpt", teacher, f"--{setting}", "--n", "2", "--steps", "2", "--out", png, "--compile", "off"]
    base = plain + ["--method", "hqdm"]
    with pytest.raises(ValueError, match="QAT checkpoints come from training"):
        sample.main(base)  # asked for by name: never calibrated on the fly
    sample.main(plain)  # the default without a QAT file: the best PTQ recipe, said so
    out = capsys.readouterr()
    assert f"{tag} {ptq} integer" in out.out and "using the best PTQ recipe" in out.err
    path = sample.quantized_path(teacher, setting, "hqdm")
    qat.main(["train", "--ckpt", teacher, "--wbits", str(wbits), "--abits", str(abits),
              "--iters", "1", "--data-dir", fake_fmnist, "--eval-n", "2", "--batch-size", "4",
              "--state-dir", str(tmp_path / "run"), "--out", path])
    capsys.readouterr()
    for args in (base, plain):  # by name, and the default
        sample.main(args)
        assert f"{tag} hqdm-single integer (loaded" in capsys.readouterr().out
    sample.main(plain + ["--simulate"])  # QAT has no float form to simulate: the best PTQ recipe
    assert f"{tag} {ptq} simulated" in capsys.readouterr().out
    fp = torch.load(teacher, weights_only=True)
    fp["step"] = 7
    torch.save(fp, teacher)
    with pytest.raises(ValueError, match="trained from another FP file"):
        sample.main(base)
    sample.main(plain)  # a QAT file of another FP model is never the default
    assert f"{tag} {ptq} integer" in capsys.readouterr().out


def test_weight_drift_counts_re_rounded_codes_and_step_ratios():
    from conftest import ROOT
    a = integer.load_quantized(os.path.join(ROOT, "checkpoints", "dit_t4_w4a4_svdquant-hadanorm.pt"))[0]
    b = copy.deepcopy(a)
    assert qat.weight_drift(a, b) == "int4 codes changed 0.0%, weight steps 1.00-1.00x"
    layers = [m for m in b.modules() if isinstance(m, integer.IntLinear)]
    total = sum(m.w_t.numel() for m in layers)
    with torch.no_grad():
        layers[0].w_t += 1  # every code of the first layer re-rounded
        layers[1].w_step *= 2
    want = 100 * layers[0].w_t.numel() / total
    assert 1 < want < 10
    got = qat.weight_drift(a, b)
    assert got == f"int4 codes changed {want:.1f}%, weight steps 1.00-2.00x", got
