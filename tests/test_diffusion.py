"""diffusion.py: schedule endpoints, respacing, and samplers against analytic toy problems."""
import numpy as np
import pytest
import torch

import dit
from diffusion import Diffusion, guided, linear_betas, space_timesteps


def test_linear_schedule_endpoints():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15
    d = Diffusion.make()
    assert abs(d.alphas_cumprod[0] - 0.9999) < 1e-12
    assert abs(d.alphas_cumprod[-1] - 4.0358e-05) < 1e-8  # ᾱ_T of DiT's linear schedule


def test_respacing_keeps_alpha_bar_exactly():
    d = Diffusion.make()
    r = d.respace(50)
    assert r.num_timesteps == 50 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    assert r.timestep_map[:4].tolist() == [0, 20, 41, 61]  # official space_timesteps(1000, [50])
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


def test_q_sample_moments():
    d = Diffusion.make()
    x0, noise = torch.full((4000, 1), 0.7), torch.randn(4000, 1)
    xt = d.q_sample(x0, torch.full((4000,), 300), noise)
    a = d.alphas_cumprod[300]
    assert abs(xt.mean().item() - 0.7 * a ** 0.5) < 0.05
    assert abs(xt.std().item() - (1 - a) ** 0.5) < 0.05


def gaussian_oracle(d_full, sigma):
    """Exact ε-predictor for data ~ N(0, σ²): E[ε | x_t] = sqrt(1-ᾱ) x_t / (ᾱ σ² + 1 - ᾱ)."""
    acp = torch.from_numpy(d_full.alphas_cumprod)
    def fn(x, t):
        a = acp[t].float().view(-1, *[1] * (x.dim() - 1))
        return (1 - a).sqrt() * x / (a * sigma ** 2 + 1 - a)
    return fn


def test_ddim_one_step_vs_many_on_a_gaussian_toy():
    sigma, z = 0.5, torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    fn = gaussian_oracle(Diffusion.make(), sigma)
    many = Diffusion.make(steps=100).sample(fn, z, "ddim", clip=False)
    one = Diffusion.make(steps=1).sample(fn, z, "ddim", clip=False)
    assert abs(many.std().item() - sigma) < 0.02  # the probability-flow ODE maps N(0,1) to N(0,σ²)
    assert one.std().item() < 0.01  # one step predicts E[x0 | x_T] ≈ the mean


def test_ddim_step_recovers_a_point_mass_with_any_step_count():
    c = torch.tensor(0.3)
    d_full = Diffusion.make()
    acp = torch.from_numpy(d_full.alphas_cumprod).float()
    def fn(x, t):
        a = acp[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()
    z = torch.randn(8, 1, 4, 4)
    for steps in (1, 7, 50):
        out = Diffusion.make(steps=steps).sample(fn, z, "ddim")
        # float32: 1/sqrt(ᾱ_T) ≈ 157
        torch.testing.assert_close(out, torch.full_like(z, 0.3), atol=2e-4, rtol=0)


def test_ddpm_matches_the_target_variance_and_is_seeded():
    sigma, z = 0.5, torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    fn = gaussian_oracle(Diffusion.make(), sigma)
    d = Diffusion.make(steps=100)
    a = d.sample(fn, z, "ddpm", clip=False, generator=torch.Generator().manual_seed(5))
    b = d.sample(fn, z, "ddpm", clip=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(a.std().item() - sigma) < 0.05


def test_cfg_guided_fn_combines_cond_and_null():
    torch.manual_seed(0)
    m = dit.build(dit.TINY, depth=1).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(3, 1, 32, 32), torch.tensor([5, 500, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 10))
        torch.testing.assert_close(guided(m, y, 1.0)(x, t), cond)
        torch.testing.assert_close(guided(m, y, 3.0)(x, t), uncond + 3.0 * (cond - uncond),
                                   atol=1e-5, rtol=1e-5)


def test_loss_is_eps_mse():
    d = Diffusion.make()
    zero = lambda x, t, y: torch.zeros_like(x)
    noise = torch.randn(16, 1, 4, 4)
    loss = d.loss(zero, torch.zeros(16, 1, 4, 4), None, t=torch.zeros(16, dtype=torch.long),
                  noise=noise)
    torch.testing.assert_close(loss, noise.pow(2).mean())


def test_lesson_writes_the_noising_strip_without_the_data_set(tmp_path):
    from PIL import Image
    from conftest import lesson_output
    out = lesson_output("diffusion.py", "--data-dir", str(tmp_path / "none"), "--out",
                        str(tmp_path / "s.png"))
    assert "DDIM sample of the shipped model" in out
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0] in ("0", "500", "999")]
    corr = [float(r[3]) for r in rows]
    # the image fades into noise
    assert len(corr) == 3 and corr[0] > 0.99 and corr[0] > corr[1] > corr[2]
    assert Image.open(tmp_path / "s.png").size == (7 * 32 * 4, 32 * 4)


def official_ddim(betas_full, keep, model_fn, x, clip, eta=0.0, noise=None):
    """The official guided-diffusion ddim_sample_loop, re-written from its formulas (respaced betas,
    float64 tables cast to float32 at each use, x̂_0 from ε, clip or not, ε always re-derived from
    x̂_0)."""
    acp_full, betas, last = np.cumprod(1 - betas_full), [], 1.0
    for i, a in enumerate(acp_full):
        if i in keep:
            betas.append(1 - a / last)
            last = a
    acp = np.cumprod(1 - np.array(betas))
    acp_prev = np.append(1.0, acp[:-1])
    ext = lambda arr, i: torch.tensor(arr[i], dtype=torch.float64).float()
    for i in range(len(keep))[::-1]:
        eps = model_fn(x, torch.full((x.shape[0],), keep[i]))
        x0 = ext(np.sqrt(1 / acp), i) * x - ext(np.sqrt(1 / acp - 1), i) * eps
        x0 = x0.clamp(-1, 1) if clip else x0
        eps = (ext(np.sqrt(1 / acp), i) * x - x0) / ext(np.sqrt(1 / acp - 1), i)
        a, ap = ext(acp, i), ext(acp_prev, i)
        sigma = eta * torch.sqrt((1 - ap) / (1 - a)) * torch.sqrt(1 - a / ap)
        x = x0 * torch.sqrt(ap) + torch.sqrt(1 - ap - sigma ** 2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * noise[i]
    return x


@pytest.mark.parametrize("clip", [True, False])  # pixels, and latents (nothing clipped)
@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_step_equals_the_official_loop_bit_for_bit(clip, steps):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 4, generator=g) * 0.5
    model_fn = lambda x, t: torch.einsum("ij,njhw->nihw", w, x) * (t.float() / 1000).view(-1, 1, 1, 1) + 0.1
    z = torch.randn(3, 4, 8, 8, generator=g)
    d = Diffusion.make(steps=steps)
    ours = d.sample(model_fn, z, "ddim", clip=clip)
    want = official_ddim(linear_betas(1000), space_timesteps(1000, steps), model_fn, z, clip)
    assert torch.equal(ours, want)


def test_ddim_step_with_eta_1_draws_the_ddpm_posterior_variance():
    """σ_t(η = 1)² = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev) is the DDPM posterior variance β̃_t:
    two runs of one step from the same x with different noise differ by 2 β̃_t in variance (σ = 0
    fails)."""
    d = Diffusion.make(steps=20)
    x = torch.randn(1, 1, 64, 64).expand(2, -1, -1, -1).contiguous()
    eps_fn = lambda x, t: 0.3 * x
    for i in (15, 5, 1):
        a = d.ddim_step(eps_fn, x[:1], i, eta=1.0, clip=False,
                        generator=torch.Generator().manual_seed(1))
        b = d.ddim_step(eps_fn, x[:1], i, eta=1.0, clip=False,
                        generator=torch.Generator().manual_seed(2))
        var = (a - b).pow(2).mean().item() / 2
        assert abs(var / d.posterior_variance[i] - 1) < 0.1, (i, var, d.posterior_variance[i])


def test_ddim_step_with_eta_keeps_the_direction_to_x_t_at_sqrt_one_minus_abar_prev_minus_sigma2():
    """η > 0: the mean is √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂, the noise σ z. Two draws with the same
    seed average out z only through its own term, so the step minus σ z must equal that mean
    exactly (dropping σ² from the direction fails)."""
    d = Diffusion.make(steps=20)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps_fn = lambda x, t: 0.3 * x
    for i, eta in ((15, 0.5), (5, 1.0)):
        got = d.ddim_step(eps_fn, x, i, eta=eta, clip=False, generator=torch.Generator().manual_seed(3))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        a_t, a_prev = float(d.alphas_cumprod[i]), float(d.alphas_cumprod_prev[i])
        eps = 0.3 * x
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5  # re-derived from x̂0, as the official loop
        sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        want = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * z
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
