"""Uniform integer quantizers and `QuantLinear`: one layer for every method (a method is data).

A `QuantLinear` computes y = x Wᵀ + b as
    x̃ = ((x − μ) / s) Hᵀ          input transform: any subset of centering μ, channel scale s, Hadamard H
    W̃ = W diag(s) Hᵀ              the same transform folded into the weight, offline
    y = (Q_a(x̃) + μ̃) Q_w(W̃)ᵀ + b + x L̃ᵀ     μ̃ = (μ / s) Hᵀ; L̃ an optional low-rank correction
Because H is orthogonal and s is undone in W̃, the transform is exact: with quantization off the
layer equals the original nn.Linear. HadaNorm's mean term μ̃ Q_w(W̃)ᵀ reuses the quantized weight,
so no float copy of W is kept.

Quantizer conventions (docs/design.md): symmetric levels [-2^(b-1), 2^(b-1)-1] with s = max|x| /
(2^(b-1)-1), asymmetric levels [0, 2^b - 1] with a zero point; granularity per tensor, per row
(tokens of x, output channels of W) or per group of g along K; range by min-max or by an MSE search
over clipping ratios.

    python quant.py          # quantization error of one random layer under each setting
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
import dit
import hadamard

# per block; everything else stays float
QUANT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


#################################################################################
#                                 Quantizer                                      #
#################################################################################

@dataclass
class QConfig:
    """How one tensor is quantized."""
    bits: int = 4
    symmetric: bool = True
    granularity: str = "row"  # "tensor" | "row" (per token / per output channel) | "group"
    group_size: int = 128
    range: str = "minmax"  # "minmax" | "mse" (search of the clipping ratio)
    dynamic: bool = True  # activations: scale from the tensor at run time, or calibrated (static)
    # static: one scale per timestep bucket (1 = one for all steps); clip: one ratio per bucket
    buckets: int = 1
    # dynamic per-token: step = ratio_bucket · max|x_token| / qmax, the ratio learnable (QAT)
    clip: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"unsupported bit width {self.bits}: choose 2..8")
        if self.granularity not in ("tensor", "row", "group"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.range not in ("minmax", "mse"):
            raise ValueError(f"unknown range method {self.range!r}")
        if not self.dynamic and not (self.symmetric and self.granularity == "tensor"):
            raise ValueError("static activation scales are symmetric and per tensor (per timestep "
                             "bucket)")
        if self.clip and not (self.dynamic and self.symmetric and self.granularity == "row"):
            raise ValueError("a learnable clipping ratio is for dynamic symmetric per-token "
                             "activations")


def levels(cfg):
    """(qmin, qmax) integer levels."""
    return (-(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1) if cfg.symmetric else (0, 2 ** cfg.bits - 1)


def _grouped(x, cfg):
    """View x so that one scale covers each last-axis slice: (..., G, g) for groups, else x."""
    if cfg.granularity != "group":
        return x
    if x.shape[-1] % cfg.group_size:
        raise ValueError(f"group size {cfg.group_size} does not divide K = {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // cfg.group_size, cfg.group_size)


def _minmax(x, cfg, ratio=1.0):
    if cfg.granularity == "tensor":
        lo, hi = x.min().reshape(1), x.max().reshape(1)
        lo, hi = lo.view([1] * x.dim()), hi.view([1] * x.dim())
    else:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    qmin, qmax = levels(cfg)
    if cfg.symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()) * ratio / qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = (lo * ratio).clamp(max=0), (hi * ratio).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = (-lo / scale.clamp(min=1e-12)).round()
    return scale.clamp(min=1e-12), zero


def quant_params(x, cfg, grid=20):
    """Scale and zero point for x under cfg (shapes broadcast against `_grouped(x, cfg)`)."""
    xg = _grouped(x.detach().float(), cfg)
    if cfg.range == "minmax":
        return _minmax(xg, cfg)
    best, best_err = None, None
    for r in torch.linspace(1.0, 0.3, grid).tolist():  # clipping ratio search, per slice
        s, z = _minmax(xg, cfg, r)
        err = (fake_quant_with(xg, s, z, cfg) - xg).pow(2)
        err = err.sum().view([1] * xg.dim()) if cfg.granularity == "tensor" else err.sum(-1, keepdim=True)
        if best is None:
            best, best_err = (s, z), err
        else:
            better = err < best_err
            best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
            best_err = torch.minimum(err, best_err)
    return best


def round_ste(x):
    """round() with a straight-through gradient."""
    # exercise quantizer: round in the forward pass, identity gradient in the backward pass (STE)
    return x + (x.round() - x).detach()
    # end exercise quantizer


def quantize_with(x, scale, zero, cfg):
    """Integer codes (as float) of x: clamp(round(x / s) + z)."""
    # exercise quantizer: the integer codes clamp(round(x / s) + z) on the levels of cfg
    qmin, qmax = levels(cfg)
    return torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
    # end exercise quantizer


def fake_quant_with(x, scale, zero, cfg):
    return (quantize_with(x, scale, zero, cfg) - zero) * scale


def fake_quant(x, cfg, params=None):
    """Dynamic (params=None: from x itself) or static fake quantization; differentiable by STE."""
    if cfg is None:
        return x
    s, z = quant_params(x, cfg) if params is None else params
    return fake_quant_with(_grouped(x, cfg), s, z, cfg).reshape(x.shape)


def quantize(x, cfg, params=None):
    """-> (int8 codes, scale, zero): the integers the integer path multiplies."""
    s, z = quant_params(x, cfg) if params is None else params
    q = quantize_with(_grouped(x.float(), cfg), s, z, cfg)
    return q.reshape(x.shape).to(torch.int8), s, z


#################################################################################
#                          Packed int4 storage                                   #
#################################################################################

# One layout, documented once: a uint8 holds two int4 values (two's complement nibbles) of
# neighbouring positions along K: the LOW nibble is the EVEN index k, the HIGH nibble is k + 1.

def pack_int4(q):
    """int8 codes in [-8, 7], shape (..., K) with K even -> uint8 (..., K/2)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape[-1]}")
    if q.dtype != torch.int8 or q.min() < -8 or q.max() > 7:
        raise ValueError("int4 packing needs int8 codes in [-8, 7]")
    # exercise int4_pack: two's complement nibbles, even k in the low nibble, k + 1 in the high one
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibbles
    return u[..., 0::2] | (u[..., 1::2] << 4)
    # end exercise int4_pack


def unpack_int4(p):
    """uint8 (..., K/2) -> int8 codes (..., K), sign-extended."""
    if p.dtype != torch.uint8:
        raise ValueError(f"packed int4 weights must be uint8, got {p.dtype}")
    # exercise int4_pack: split each byte into its two sign-extended nibbles, back in k order
    s = p.view(torch.int8)
    lo = (s << 4) >> 4  # arithmetic shift sign-extends the low nibble  # important!
    hi = s >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    # end exercise int4_pack


def sqnr(ref, x):
    """Signal-to-quantization-noise ratio of x against ref, in dB."""
    return (10 * torch.log10(ref.pow(2).mean() / (x - ref).pow(2).mean().clamp(min=1e-20))).item()


#################################################################################
#                                 QuantLinear                                    #
#################################################################################

class QuantLinear(nn.Module):
    """A linear layer with an exact input transform, weight/activation quantizers and low-rank
    branch."""
    def __init__(self, linear, wq=None, aq=None, center="none", scale=None, rotate=False,
                 block=None,
                 signs=None, static_mean=None, single=False):
        super().__init__()
        if single and not rotate:
            raise ValueError("single-Hadamard (HQ-DM) mode needs rotate=True")
        if center not in ("none", "dynamic", "static"):
            raise ValueError(f"unknown centering {center!r}: none, dynamic or static")
        if center == "static" and static_mean is None:
            raise ValueError("static centering needs a calibrated mean")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wq, self.aq, self.center, self.rotate, self.block = wq, aq, center, rotate, block
        # HQ-DM: quantize x in the Hadamard domain, rotate back, W stays unrotated
        self.single = single
        W = linear.weight.detach().float()  # (N, K)
        self.register_buffer("s", None if scale is None else scale.detach().float().clone())
        self.register_buffer("signs", None if signs is None else signs.float())
        self.register_buffer("mu_static",
                             None if static_mean is None else static_mean.detach().float().clone())
        if self.s is not None:
            # exercise hadanorm: fold the channel scale into W, W diag(s); center and scale x in transform_input
            W = W * self.s  # W diag(s)
            # end exercise hadanorm
        if rotate and not single:
            W = hadamard.transform(W, block=block, signs=self.signs)  # W diag(s) Hᵀ
        self.weight = nn.Parameter(W, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        self.register_buffer("w_scale", None)
        self.register_buffer("w_zero", None)
        self.lora_u = self.lora_v = None
        self.quantize_enabled = True
        self.input_prescaled = False  # DiTAS: x / s already folded into the producing layer
        static = aq is not None and not aq.dynamic
        # per timestep bucket
        self.register_buffer("a_scale", torch.ones(aq.buckets) if static else None)
        clip = aq is not None and aq.clip
        # 1 = per-token min-max
        self.register_buffer("a_clip", torch.ones(aq.buckets) if clip else None)
        self.t_bucket = None  # (N,) bucket of each sample, set by the model's timestep hook
        self.refresh_weight_quant()

    def refresh_weight_quant(self):
        """(Re)computes the static weight scales from the current (transformed) weight."""
        if self.wq is not None:
            self.w_scale, self.w_zero = quant_params(self.weight, self.wq)

    def set_lora(self, u, v):
        """Low-rank correction L̃ = U V in the transformed space: adds x̃ Vᵀ Uᵀ."""
        self.lora_u, self.lora_v = nn.Parameter(u.float(), requires_grad=False), nn.Parameter(v.float(), requires_grad=False)

    def qweight(self):
        if self.wq is None or not self.quantize_enabled:
            return self.weight
        return fake_quant(self.weight, self.wq, (self.w_scale, self.w_zero))

    def transform_input(self, x):
        """x -> (x̃, μ̃): centered, scaled and rotated input, and the transformed mean (or None)."""
        mu = None
        if self.center == "dynamic":
            # (N, 1, K)
            mu = x.mean(dim=-2, keepdim=True) if x.dim() >= 3 else x.mean(dim=0, keepdim=True)
        elif self.center == "static":
            mu = self.mu_static
        if mu is not None:
            # exercise hadanorm: center the input on its channel means
            x = x - mu
            # end exercise hadanorm
        if self.s is not None and not self.input_prescaled:
            # exercise hadanorm: divide the input (and its mean) by the channel scale s
            x = x / self.s
            mu = None if mu is None else mu / self.s
            # end exercise hadanorm
        if self.rotate:
            x = hadamard.transform(x, block=self.block, signs=self.signs)
            mu = None if mu is None else hadamard.transform(mu, block=self.block, signs=self.signs)
        return x, mu

    @property
    def buckets(self):
        return self.aq.buckets if self.aq is not None else 1

    def per_bucket(self, v, xt):
        """v[bucket of each sample], shaped (N, 1, 1) to broadcast over its tokens and channels."""
        b = self.t_bucket if self.t_bucket is not None else torch.zeros(xt.shape[0], dtype=torch.long)
        return v[b.to(v.device)].view(-1, *[1] * (xt.dim() - 1))

    def static_scale(self, xt):
        """The activation step of each token: the calibrated one of its sample's timestep bucket, or
        (clip) its own max|x̃| times the bucket's learned clipping ratio, over qmax."""
        if self.a_clip is not None:
            m = xt.detach().abs().amax(-1, keepdim=True)  # (N, T, 1), a constant for the gradient
            return (m * self.per_bucket(self.a_clip.clamp(min=1e-3), xt) / levels(self.aq)[1]).clamp(min=1e-12)
        # a learnable (QAT) step must stay positive
        return self.per_bucket(self.a_scale.clamp(min=1e-8), xt)

    def act_quant(self, xt):
        if self.aq is None or not self.quantize_enabled:
            return xt
        if self.aq.dynamic and self.a_clip is None:
            return fake_quant(xt, self.aq)
        return fake_quant_with(xt, self.static_scale(xt), 0.0, self.aq)

    def forward(self, x):
        xt, mu = self.transform_input(x)  # (N, T, K)
        xq = self.act_quant(xt)
        if mu is not None:
            xq = xq + mu  # μ̃ shares Q(W̃): y = (Q(x̃) + μ̃) Q(W̃)ᵀ
        if self.single:  # HQ-DM: back to W's unrotated domain, y = [Q(x Hᵀ) H] Q(W)ᵀ
            xq = self.unrotate(xq)
        y = nn.functional.linear(xq, self.qweight(), self.bias)  # (N, T, N_out)
        if self.lora_u is not None:
            y = y + self.lora_branch(xt, mu)
        return y

    def lora_branch(self, xt, mu):
        """The float low-rank branch on the unquantized transformed input (W's domain in single
        mode)."""
        xf = xt if mu is None else xt + mu
        return ((self.unrotate(xf) if self.single else xf) @ self.lora_v.T) @ self.lora_u.T

    def unrotate(self, x):
        return hadamard.transform(x, inverse=True, block=self.block, signs=self.signs)

    def extra_repr(self):
        t = [n for n,
             on in (("center=" + self.center, self.center != "none"), ("scale", self.s is not None),
                             ("hadamard" + (f"(block={self.block})" if self.block else ""), self.rotate)) if on]
        q = lambda c: "fp" if c is None else f"{'s' if c.symmetric else 'a'}{c.bits}/{c.granularity}/{c.range}"
        return f"{self.in_features}->{self.out_features}, W {q(self.wq)}, A {q(self.aq)}, transform [{', '.join(t)}]"


def quant_layers(model):
    """(name, parent, attr, module) of every layer that quantization replaces, in block order."""
    out = []
    for i, blk in enumerate(model.blocks):
        for path in QUANT_LAYERS:
            parent_name, attr = path.split(".")
            parent = getattr(blk, parent_name)
            out.append((f"blocks.{i}.{path}", parent, attr, getattr(parent, attr)))
    return out


def quantize_model(model, recipe):
    """Swaps qkv/proj/fc1/fc2 of every block for QuantLinear built from `recipe` (a dict).

    recipe keys: wq, aq (QConfig or None), center, rotate, block, signs_seed, and per-layer dicts
    `scales` / `means` {layer name: tensor} from calibration and `layer_abits` {layer name: bits}
    (mixed precision). Returns the model (changed in place).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized; quantize the full-precision model instead")
    for name, parent, attr, lin in quant_layers(model):
        signs = hadamard.random_signs(lin.in_features, recipe["signs_seed"]) if recipe.get("signs_seed") is not None else None
        aq = recipe.get("aq")
        # mixed precision: this layer's own activation bits
        if name in recipe.get("layer_abits", {}):
            aq = dataclasses.replace(aq, bits=recipe["layer_abits"][name])
        q = QuantLinear(lin, recipe.get("wq"), aq, recipe.get("center", "none"),
                        recipe.get("scales", {}).get(name), recipe.get("rotate", False),
                            recipe.get("block"),
                        signs, recipe.get("means", {}).get(name), recipe.get("single", False))
        setattr(parent, attr, q.to(lin.weight.device))
    attach_timestep_hook(model)
    return model


def attach_timestep_hook(model):
    """Per-timestep activation scales (static) and clipping ratios (clip) need each sample's
    timestep: a pre-hook on the timestep embedder (called on every forward, CFG included) hands
    every layer that has them its bucket, t * buckets // 1000. Not on the DiT itself:
    forward_with_cfg calls self.forward directly. The layers are listed on the embedder, so a deep
    copy of the model
    updates its own layers."""  # important!
    emb = model.t_embedder
    emb.bucket_users = [m for m in model.modules() if getattr(m, "a_scale", None) is not None
                        # QuantLinear and its integer form
                        or getattr(m, "a_clip", None) is not None]
    if emb.bucket_users and getattr(emb, "bucket_hook", None) is None:
        emb.bucket_hook = emb.register_forward_pre_hook(_set_buckets)


def _set_buckets(emb, args):
    t = args[0]  # (N,) original timesteps 0..999
    for q in emb.bucket_users:
        q.t_bucket = (t.long() * q.buckets // 1000).clamp(0, q.buckets - 1)


@torch.no_grad()
def layer_report(fp_model, q_model, stats):
    """Per layer: SQNR of the quantized activations (raw vs transformed) and of the layer output."""
    fp = {n: lin for n, _, _, lin in quant_layers(fp_model)}
    rows = []
    for name, _, _, q in quant_layers(q_model):
        x = stats[name]["samples"].to(q.bias.device if q.bias is not None else "cpu")
        if q.a_scale is not None:  # static scales: each stored input's own timestep bucket
            q.t_bucket = (stats[name]["samples_t"] * q.aq.buckets // 1000).clamp(max=q.aq.buckets - 1)
        ref = fp[name](x)
        proj = q_model.get_submodule(name.replace("qkv", "proj"))
        if name.endswith("qkv") and getattr(proj, "input_prescaled", False):
            D = x.shape[-1]
            # DiTAS folded proj's 1/s into the V rows: compare like with like
            ref[..., 2 * D:] /= proj.s
        xin = x / q.s if getattr(q, "input_prescaled", False) else x
        xt, _ = q.transform_input(xin)
        a_raw = sqnr(x, fake_quant(x, q.aq)) if q.aq else float("inf")
        a_t = sqnr(xt, fake_quant(xt, q.aq)) if q.aq else float("inf")
        rows.append((name, a_raw, a_t, sqnr(ref, q(xin))))
    return rows


def set_quantization(model, enabled):
    """Turns fake quantization on/off everywhere (the transform stays: it is exact)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.quantize_enabled = enabled


@torch.no_grad()
def lesson_activations(n=8, steps=10, block=3):
    """Inputs of block `block`'s four linears while the shipped model samples (DDIM, CFG 1.5)."""
    from diffusion import Diffusion, class_labels, guided, make_noise
    model = dit.load_checkpoint(dit.DEFAULT_CKPT)[0]
    acts = {}
    hooks = [model.get_submodule(f"blocks.{block}.{n_}").register_forward_pre_hook(
        lambda mod, inp,
            n_=n_: acts.setdefault(n_, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
        for n_ in QUANT_LAYERS]
    y = class_labels(n, list(range(model.num_classes)))
    Diffusion.make(steps=steps).sample(guided(model, y, 1.5), make_noise(n, model, 0))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}  # name -> (tokens, K)


def main():
    ap = common.Parser(description="Lesson: activation quantization error (SQNR, dB) of the "
                                   "shipped model's "
                                             "real activations at 8/4/3 bits, per tensor vs per "
                                             "token vs per group.")
    ap.add_argument("--n", type=int, default=8, help="images sampled to collect activations")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--block", type=int, default=3)
    args = ap.parse_args()
    if args.n < 1 or args.steps < 1:
        raise ValueError("--n and --steps must be positive")
    acts = lesson_activations(args.n, args.steps, args.block)
    print(f"SQNR (dB, higher is better) of Q(x) for the inputs x of block {args.block}'s linears, "
          f"{args.n} images x {args.steps} DDIM steps of {dit.DEFAULT_CKPT}:")
    print(f"{'bits':>4s} {'granularity':16s}" + "".join(f"{k:>10s}" for k in acts))
    for bits in (8, 4, 3):
        for g, kw in (("per tensor", dict(granularity="tensor")), ("per token", {}),
                      ("per group of 32", dict(granularity="group", group_size=32))):
            row = [sqnr(x, fake_quant(x, QConfig(bits, **kw))) for x in acts.values()]
            print(f"{bits:4d} {g:16s}" + "".join(f"{v:10.2f}" for v in row))
    print("each bit is worth ~6 dB; finer scales help most where a few channels or tokens are "
          "outliers")

if __name__ == "__main__":
    common.run_cli(main)
