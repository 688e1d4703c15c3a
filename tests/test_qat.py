"""qat.py: LSQ/STE gradients, a QAT step lowers the distillation loss, exact resume, integer ==
sim."""
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


@pytest.mark.parametrize("act,init,loss",
                         [("token", "hadanorm", "guided"), ("static", "hadanorm", "branch"),
                                           ("token", "svdquant-hadanorm", "guided")])
def test_a_few_qat_steps_lower_the_distillation_loss(teacher, act, init, loss):
    fp, _ = dit.load_checkpoint(teacher)
    model, rec = qat.prepare(fp, 4, 4, "single", calib_n=2, calib_steps=4, act=act, init=init)
    # trajectories 0, 2 at CFG 4; 1, 3 at 1.5
    data = qat.trajectories(fp, n=4, steps=3, cfg_scale=(4.0, 1.5))
    one = qat.trajectories(fp, n=4, steps=3, cfg_scale=4.0)
    assert [len(d) for d in data] == [12] * 6 and data[5].tolist() == [4.0, 1.5, 4.0, 1.5] * 3
    # (steps x trajectories): the CFG-4 trajectories agree with `one`
    at4 = torch.tensor([0, 2, 4, 6, 8, 10])
    for d, o in zip(data, one):
        torch.testing.assert_close(d[at4], o[at4])
    # the CFG-1.5 ones go elsewhere after step 0
    assert not torch.allclose(data[0][[5, 9]], one[0][[5, 9]])
    qs = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert (init == "svdquant-hadanorm") == all(q.lora_u is not None and q.lora_u.requires_grad for q in qs)
    opt = qat.make_optimizer(model, 1e-4, 1e-3)
    before = qat.distill_loss(model, data, loss).item()
    a0 = [(q.a_clip if act == "token" else q.a_scale).detach().clone() for q in qs]
    for _ in range(5):
        opt.zero_grad()
        qat.distill_loss(model, data, loss).backward()
        opt.step()
    a = [q.a_clip if act == "token" else q.a_scale for q in qs]
    # gradients reach the activation steps
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a)
    assert all(not torch.equal(p, p0) for p, p0 in zip(a, a0))  # and move them
    assert qat.distill_loss(model, data, loss).item() < before


def test_guided_loss_is_the_error_of_what_the_sampler_uses(teacher):
    """The guided loss equals the MSE of ε_null + s (ε_cond − ε_null) between the two models, at
    each trajectory's own scale (a loss on the two halves alone does not)."""
    fp, _ = dit.load_checkpoint(teacher)
    model, _ = qat.prepare(fp, 4, 4, "single", calib_n=2, calib_steps=4)
    # no quantizer: the sums must agree to float rounding, whatever the batch
    quant.set_quantization(model, False)
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, quant.QuantLinear):
                # a model that differs from the teacher
                q.weight += 0.01 * torch.randn_like(q.weight)
    data = qat.trajectories(fp, n=2, steps=2, cfg_scale=(4.0, 1.5))
    x, t, y, ec, eu, s = data
    with torch.no_grad():
        from diffusion import guided
        got = qat.distill_loss(model, data, "guided").item()
        want = torch.cat([(guided(model, y[i:i + 1], s[i].item())(x[i:i + 1], t[i:i + 1])
                           - (eu[i] + s[i] * (ec[i] - eu[i]))).pow(2).flatten() for i in range(len(x))]).mean()
        assert abs(got - want.item()) <= 1e-5 * want.item() + 1e-8
        assert abs(qat.distill_loss(model, data, "branch").item() - got) > 1e-3 * got


def test_hadanorm_init_with_token_clip_starts_at_ptq_hadanorm(teacher):
    """Step 0 of the default QAT (clip ratios 1) is PTQ HadaNorm in the single-Hadamard form; the
    double form is exactly PTQ HadaNorm."""
    fp, _ = dit.load_checkpoint(teacher)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([40, 700]), torch.tensor([1, 2])
    ptq_model = dit.load_checkpoint(teacher)[0]
    ptq, _ = calibrate.quantize_fp(ptq_model, "hadanorm", 4, 4, calib_n=2, calib_steps=4, seed=0)
    double, rec = qat.prepare(fp, 4, 4, "double", calib_n=2, calib_steps=4)
    assert rec.center == "dynamic" and all(torch.equal(ptq.scales[k], v)
                                           for k, v in rec.scales.items())
    with torch.no_grad():
        torch.testing.assert_close(double(x, t, y), ptq_model(x, t, y))


def args(teacher, run, iters, *extra):
    return qat.get_args(["train", "--ckpt", teacher, "--iters", str(iters), "--traj", "2",
                         "--steps", "3",
                         "--batch-size", "4", "--state-dir", run, "--ckpt-every", "2", *extra])


def test_resume_gives_the_same_losses_and_refuses_other_settings(tmp_path, teacher):
    _, _, _, full = qat.train(args(teacher, str(tmp_path / "a"), 4))
    _, _, _, first = qat.train(args(teacher, str(tmp_path / "b"), 2))
    _, _, _, rest = qat.train(args(teacher, str(tmp_path / "b"), 4, "--resume"))
    assert first + rest == full
    with pytest.raises(ValueError, match="other settings"):
        qat.train(args(teacher, str(tmp_path / "b"), 6, "--resume", "--abits", "3"))


@pytest.mark.parametrize("mode,act", [(m, "token") for m in qat.MODES] + [("single", "static")])
def test_qat_checkpoint_integer_path_equals_simulation(tmp_path, teacher, mode, act):
    model, recipe, cfg, _ = qat.train(args(teacher, str(tmp_path / mode), 2, "--hadamard", mode,
                                           "--act", act))
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
    r = subprocess.run([sys.executable, "qat.py", "train", "--ckpt", teacher, "--abits", "2", "--iters", "1"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "unsupported bit width 2" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "qat.py", "train", "--ckpt", teacher, "--act", "tensor"],
                       cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'tensor'" in r.stderr


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path, teacher):
    import re
    runs = {"one": [sys.executable, "qat.py"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "qat.py"]}
    got = {}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + ["train", "--ckpt", teacher, "--iters", "3", "--traj", "2",
                                  "--steps", "3", "--batch-size", "4",
                                  "--state-dir", str(tmp_path / name)], cwd=ROOT,
                                      capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r"loss (\S+) \(first \d+\) -> (\S+) \(last", r.stdout)
        got[name] = [float(m.group(1)), float(m.group(2))]
    assert len(got["one"]) == 2
    for a, b in zip(got["one"], got["two"]):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_lesson_loss_goes_down(capsys, monkeypatch):
    from conftest import ROOT
    monkeypatch.chdir(ROOT)  # the lesson reads the shipped checkpoint
    qat.lesson(steps=10, n=2, traj_steps=3)
    losses = [float(l.split()[-1]) for l in capsys.readouterr().out.splitlines() if l.strip().startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_evaluate_table_scores_a_qat_checkpoint(tmp_path, teacher, capsys):
    import evaluate
    model, recipe, cfg, _ = qat.train(args(teacher, str(tmp_path / "r"), 1))
    out = str(tmp_path / "q.pt")
    qat.export(model, recipe, cfg, out, {})
    evaluate.main(["table", "--ckpt", teacher, "--n", "4", "--steps", "2", "--settings", "",
                   "--methods", "",
                   "--qckpt", out, "--compile", "off"])
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    assert rows[1].startswith("| FP32 | fp32 (eager) | 1.5 | 4 |")
    assert rows[2].startswith("| W4A4 hqdm-single (q.pt) | integer | 1.5 | 4 |")
    qat.main(["score", out, "--ckpt", teacher, "--traj", "2", "--steps", "3", "--seed", "7"])
    fp = dit.load_checkpoint(teacher)[0]
    data = qat.trajectories(fp, n=2, steps=3, seed=7)
    got = float(capsys.readouterr().out.split("MSE(ε_q, ε_fp) ")[1].split()[0])
    want = qat.score(integer.load_quantized(out)[0], data)
    assert abs(got - want) <= 1e-3 * want  # the CLI prints score() of the loaded checkpoint
    # chunks are weighted by their size (6 = 5 + 1): exact where no quantizer can flip a code with
    # the batch shape (a 4-bit model's loss moves with the GEMM kernel a batch shape picks, by ~1e-4
    # on AMX)
    noisy = qat.prepare(fp, 8, 8, "none", init="plain")[0]
    with torch.no_grad():
        quant.set_quantization(noisy, False)
        for p in noisy.parameters():
            p += 0.01 * torch.randn_like(p)  # a model that differs from the teacher
        full = qat.distill_loss(noisy, data).item()
    assert abs(qat.score(noisy, data, chunk=5) - full) <= 1e-5 * full
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.main(["table", "--ckpt", teacher, "--qckpt", str(tmp_path / "none.pt")])


def test_sample_hqdm_loads_the_qat_checkpoint_beside_the_fp_one(tmp_path, teacher, capsys):
    import sample
    setting = "w4a3"
    wbits, abits = sample.SETTINGS[setting]
    tag, ptq = setting.upper(), sample.BEST_METHOD[setting]
    png = str(tmp_path / "s.png")
    base = ["--ckpt", teacher, f"--{setting}", "--method", "hqdm", "--n", "2", "--steps", "2",
            "--out", png, "--compile", "off"]
    with pytest.raises(ValueError, match="QAT checkpoints come from training"):
        sample.main(base)  # never calibrated on the fly
    path = sample.quantized_path(teacher, setting, "hqdm")
    qat.main(["train", "--ckpt", teacher, "--wbits", str(wbits), "--abits", str(abits),
              "--iters", "1", "--traj", "2", "--steps", "3", "--batch-size", "4",
              "--state-dir", str(tmp_path / "run"), "--out", path])
    capsys.readouterr()
    sample.main(base)
    assert f"{tag} hqdm-single integer (loaded" in capsys.readouterr().out
    plain = [a for a in base if a not in ("--method", "hqdm")]
    sample.main(plain)  # the QAT file beside --ckpt is never the default: the best PTQ recipe
    assert f"{tag} {ptq} integer" in capsys.readouterr().out
    sample.main(plain + ["--simulate"])  # QAT has no float form to simulate: the best PTQ recipe
    assert f"{tag} {ptq} simulated" in capsys.readouterr().out
    fp = torch.load(teacher, weights_only=True)
    fp["step"] = 7
    torch.save(fp, teacher)
    with pytest.raises(ValueError, match="trained from another FP file"):
        sample.main(base)

