"""Gaussian diffusion as DiT uses it: linear β schedule, ε-prediction, respacing, DDIM and DDPM.

What DiT needs from ADM's 873-line file, and nothing else. Schedule arithmetic is in float64
(as the official code, in numpy) and cast to the sample's dtype at each use.

    python diffusion.py      # lesson: a real image noised at several t (PNG strip), ᾱ_t, SNR
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
import data
import dit


#################################################################################
#                                 The schedule                                  #
#################################################################################

def linear_betas(num_timesteps=1000):
    """DiT's 'linear' schedule: 1e-4 -> 0.02 over 1000 steps (scaled for other lengths), float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, n):
    """The n original timesteps kept by respacing (official `space_timesteps(T, [n])`)."""
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"number of sampling steps must be in 1..{num_timesteps}, got {n}")
    if n == 1:  # official code keeps t=0 here (and its DDIM then fails); one step means T -> 0
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (n - 1)
    return sorted({round(i * stride) for i in range(n)})


class Diffusion:
    """A (possibly respaced) discrete diffusion: coefficients in float64, indexed by step."""
    def __init__(self, betas, timestep_map=None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.timestep_map = (np.arange(self.num_timesteps) if timestep_map is None
                             else np.asarray(timestep_map))
        a = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(a)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(a) / one_minus

    @classmethod
    def make(cls, num_timesteps=1000, steps=None):
        """The training diffusion (steps=None) or the one respaced to `steps` sampling steps."""
        base = cls(linear_betas(num_timesteps))
        return base if steps is None else base.respace(steps)

    def respace(self, n):
        """Keeps n timesteps; new betas reproduce the kept ᾱ exactly (official SpacedDiffusion)."""
        keep = space_timesteps(self.num_timesteps, n)
        betas, last = [], 1.0
        for i, acp in enumerate(self.alphas_cumprod):
            if i in keep:
                betas.append(1 - acp / last)
                last = acp
        return Diffusion(betas, self.timestep_map[keep])

    def _at(self, arr, t, x):
        """Gathers arr[t] as a tensor broadcastable to x."""
        out = torch.from_numpy(arr).to(x.device)[t].to(x.dtype)
        return out.view(-1, *([1] * (x.dim() - 1)))

    # --- training ---------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """Diffuses x0 to step t: sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε."""
        # exercise q_sample: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, with the coefficients gathered at t
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        # end exercise q_sample

    def loss(self, model, x0, y, t=None, noise=None):
        """ε-prediction MSE. With learn_sigma the ε half is trained (DiT adds a VB term; we
        don't)."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, noise),
                    torch.as_tensor(self.timestep_map, device=x0.device)[t], y)
        return F.mse_loss(out[:, : x0.shape[1]].float(), noise)

    # --- sampling ---------------------------------------------------------------------------
    def _eps_x0(self, model_fn, x, t, clip):
        """The model's ε, the x̂_0 it implies (clipped to [-1, 1] for pixels), and ε re-derived
        from that x̂_0, always, as the official DDIM step does (on the latent path too, where
        nothing is clipped:
        the round trip is not the identity in float32)."""
        out = model_fn(x, torch.as_tensor(self.timestep_map, device=x.device)[t])
        C = x.shape[1]
        eps, rest = out[:, :C], out[:, C:]
        recip = self._at(np.sqrt(1.0 / self.alphas_cumprod), t, x)
        recipm1 = self._at(np.sqrt(1.0 / self.alphas_cumprod - 1), t, x)
        x0 = recip * x - recipm1 * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (recip * x - x0) / recipm1  # important! the official code re-derives ε from x̂_0
        return eps, x0, rest

    def ddim_step(self, model_fn, x, i, eta=0.0, clip=True, generator=None):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps, x0, _ = self._eps_x0(model_fn, x, t, clip)
        # exercise ddim_step: DDIM's σ_t(η) and the mean √ᾱ_prev x0 + √(1 − ᾱ_prev − σ²) ε
        a_prev = self._at(self.alphas_cumprod_prev, t, x)
        a_t = self._at(self.alphas_cumprod, t, x)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
        mean = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps
        # end exercise ddim_step
        if i == 0 or eta == 0:
            return mean
        return mean + sigma * torch.randn(x.shape, generator=generator, device=x.device,
                                          dtype=x.dtype)

    def ddpm_step(self, model_fn, x, i, clip=True, generator=None):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps, x0, rest = self._eps_x0(model_fn, x, t, clip)
        mean = (self._at(self.posterior_mean_coef1, t, x) * x0
                + self._at(self.posterior_mean_coef2, t, x) * x)
        if rest.shape[1] == x.shape[1]:  # learn_sigma: interpolate between β and posterior variance
            lo = self._at(self.posterior_log_variance_clipped, t, x)
            hi = self._at(np.log(self.betas), t, x)
            frac = (rest + 1) / 2
            log_var = frac * hi + (1 - frac) * lo
        else:  # fixed-large variance, as DiT without learn_sigma
            big = np.append(self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0],
                            self.betas[1:])
            log_var = self._at(np.log(big), t, x)
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator,
                                                             device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def sample(self, model_fn, noise, sampler="ddim", eta=0.0, clip=True, generator=None,
               progress=False):
        """Runs the reverse process from `noise` (= x_T) to x_0 over every step of this
        diffusion."""
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        x = noise
        for i in tqdm(range(self.num_timesteps)[::-1], disable=not progress, desc=sampler,
                      leave=False):
            if sampler == "ddim":
                x = self.ddim_step(model_fn, x, i, eta, clip, generator)
            else:
                x = self.ddpm_step(model_fn, x, i, clip, generator)
        return x


#################################################################################
#                          Classifier-free guidance                              #
#################################################################################

def guided(model, y, cfg_scale, guide_channels=3):
    """A model_fn(x, t) for class labels y: plain conditional, or CFG with the null class.

    With cfg_scale > 1 the batch is doubled: [x, x] with labels [y, null] (DiT's sample.py).
    `guide_channels` as in `DiT.forward_with_cfg` (3 = official quirk; None = all ε channels).
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    null = torch.full_like(y, model.num_classes)

    def fn(x, t):
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]),
                                     cfg_scale, guide_channels)
        return out[: len(x)]
    return fn


def class_labels(n, classes):
    """n labels cycling through `classes`: balanced, and the same for every model compared."""
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


def make_noise(n, model, seed):
    """x_T for n samples from one seed; sample i's noise does not depend on n or the batch size."""
    g = torch.Generator().manual_seed(seed)
    size = model.x_embedder.img_size[0]
    return torch.randn(n, model.in_channels, size, size, generator=g)  # (N, C, H, W)


def sample_states(model, n=8, steps=8, cfg_scale=4.0, seed=1234):
    """The sampler's states (x_t, t, y) along the model's own DDIM trajectories, one batch per
    step."""
    diffusion = Diffusion.make(steps=steps)
    device = next(model.parameters()).device
    y = class_labels(n, list(range(model.num_classes))).to(device)
    x, fn, out = make_noise(n, model, seed).to(device), guided(model, y, cfg_scale), []
    for i in range(steps)[::-1]:
        out.append((x, torch.full((n,), int(diffusion.timestep_map[i]), device=device), y))
        x = diffusion.ddim_step(fn, x, i, clip=model.in_channels != 4)
    return out


@torch.no_grad()
def record_inputs(model, names, n=8, steps=10, cfg_scale=1.5, seed=0):
    """The inputs of the submodules `names` while `model` samples n images (DDIM, fixed noise)
    -> {name: (tokens, K)}."""
    acts = {}

    def keep(name):  # a pre-hook that stores the input as (tokens, K)
        return lambda mod, inp: acts.setdefault(name, []).append(
            inp[0].reshape(-1, inp[0].shape[-1]))
    hooks = [model.get_submodule(name).register_forward_pre_hook(keep(name)) for name in names]
    try:
        y = class_labels(n, list(range(model.num_classes)))
        Diffusion.make(steps=steps).sample(guided(model, y, cfg_scale), make_noise(n, model, seed))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(acts[name]) for name in names}


def lesson_image(data_dir=None):
    """A real training image (Fashion-MNIST, if installed) or else one DDIM sample of the shipped
    model."""
    try:
        # (1, 1, 32, 32)
        return data.load("train", data_dir)[0][:1].float(), "Fashion-MNIST training image 0"
    except FileNotFoundError:
        if not os.path.exists(dit.DEFAULT_CKPT):
            raise
        model = dit.load_checkpoint(dit.DEFAULT_CKPT)[0]
        x = Diffusion.make(steps=25).sample(guided(model, torch.tensor([0]), 4.0),
                                            make_noise(1, model, 0))
        return x, "a DDIM sample of the shipped model (data set not installed)"


def main():
    ap = common.Parser(description="Lesson: a real image noised by q_sample at several t, the schedule's ᾱ_t and signal-to-noise ratio, and a respaced set of timesteps.")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps to respace to")
    ap.add_argument("--out", default="runs/lessons/noising.png", help="the PNG strip of x_t")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's)")
    args = ap.parse_args()
    d = Diffusion.make()
    print(f"betas {d.betas[0]:.2e} -> {d.betas[-1]:.2e}; alpha_bar {d.alphas_cumprod[0]:.6f} -> {d.alphas_cumprod[-1]:.3e}")
    x0, src = lesson_image(args.data_dir)
    ts = [0, 50, 100, 250, 500, 750, 999]
    eps = torch.randn(len(ts), *x0.shape[1:], generator=torch.Generator().manual_seed(0))
    xt = d.q_sample(x0.expand(len(ts), -1, -1, -1), torch.tensor(ts), eps)  # (len(ts), C, H, W)
    print(f"x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε of {src}:\n{'t':>5s} {'ᾱ_t':>9s} {'SNR (dB)':>9s} {'corr(x_t, x0)':>14s}")
    for i, t in enumerate(ts):
        a = d.alphas_cumprod[t]
        corr = torch.corrcoef(torch.stack([xt[i].flatten(), x0[0].flatten()]))[0, 1]
        print(f"{t:5d} {a:9.5f} {10 * np.log10(a / (1 - a)):9.2f} {corr.item():14.3f}")
    strip = torch.cat(list(xt.clamp(-1, 1)), dim=-1)  # (C, H, W·len(ts)): left t=0 ... right t=999
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    img = Image.fromarray(data.to_uint8(strip[None])[0, ..., 0].numpy())
    common.save_image(img.resize((img.width * 4, img.height * 4), Image.NEAREST), args.out)
    r = d.respace(args.steps)
    print(f"wrote {args.out} (t = {ts}); respaced to {r.num_timesteps} steps: t = {r.timestep_map[:5].tolist()} ... {r.timestep_map[-3:].tolist()}")

if __name__ == "__main__":
    common.run_cli(main)
