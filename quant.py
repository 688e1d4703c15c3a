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

    python quant.py    # SQNR of the shipped model's activations at 8/4/3 bits, per tensor/token/group
"""
import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import common
import dit
from diffusion import record_inputs
from hadamard import random_signs, transform as hadamard_transform

# per block; everything else stays float
QUANT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
CENTER = ("none", "dynamic", "static")  # no centring, the per-sample token mean, a calibrated one
HADAMARD = ("none", "double", "single")  # see QuantLinear


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
            raise ValueError("static activation scales are symmetric and per tensor (per timestep bucket)")
        if self.clip and not (self.dynamic and self.symmetric and self.granularity == "row"):
            raise ValueError("a learnable clipping ratio is for dynamic symmetric per-token activations")


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
        lo, hi = x.min().view([1] * x.dim()), x.max().view([1] * x.dim())
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
#                  The input transform and the activation step                   #
#################################################################################
# One implementation, used by the simulation (QuantLinear) and the integer path (integer.IntLinear).

def transform_input(x, center="none", mean=None, scale=None, rotate=False, block=None, signs=None,
                    factors=None):
    """x (S, T, K) -> (x̃, μ̃): x̃ = ((x − μ) / s) Hᵀ, each part optional, and μ̃ = (μ / s) Hᵀ (S or
    1, 1, K) or None. center "dynamic": μ is each sample's mean over its tokens; "static": `mean`.
    `factors`: the Hadamard's Kronecker factors, made once by the caller (hadamard.kron_factors)."""
    mu = None
    if center == "dynamic":
        mu = x.mean(dim=-2, keepdim=True) if x.dim() >= 3 else x.mean(dim=0, keepdim=True)  # (S, 1, K)
    elif center == "static":
        mu = mean
    if mu is not None:
        # exercise hadanorm: center the input on its channel means
        x = x - mu
        # end exercise hadanorm
    if scale is not None:
        # exercise hadanorm: divide the input (and its mean) by the channel scale s
        x = x / scale.to(x.dtype)
        mu = None if mu is None else mu / scale.to(x.dtype)
        # end exercise hadanorm
    if rotate:
        x = hadamard_transform(x, block=block, signs=signs, factors=factors)
        mu = None if mu is None else hadamard_transform(mu, block=block, signs=signs, factors=factors)
    return x, mu


def per_bucket(v, t_bucket, xt):
    """v[timestep bucket of each sample], shaped (S, 1, 1) to broadcast over its tokens."""
    b = t_bucket if t_bucket is not None else torch.zeros(xt.shape[0], dtype=torch.long)
    return v[b.to(v.device)].view(-1, *[1] * (xt.dim() - 1))


def act_step(xt, bits, clip=None, static=None, t_bucket=None):
    """Each token's symmetric activation step (S, T, 1): max|x̃_token| / qmax (dynamic per token),
    times a learned clipping ratio of its sample's timestep bucket (`clip`), or a calibrated step
    per bucket (`static`)."""
    qmax = 2 ** (bits - 1) - 1
    if static is not None:  # a learnable (QAT) step must stay positive
        return per_bucket(static.clamp(min=1e-8), t_bucket, xt)
    m = xt.detach().abs().amax(-1, keepdim=True)  # (S, T, 1), a constant for the gradient
    if clip is not None:
        m = m * per_bucket(clip.clamp(min=1e-3), t_bucket, xt)
    return (m / qmax).clamp(min=1e-12)


def cfg_delta_default():
    """Whether new layers code a CFG batch's null half as a difference (`pair_codes`): on unless
    the environment says DIT4BIT_CFG_DELTA=off (to reproduce each half coded on its own)."""
    v = os.environ.get("DIT4BIT_CFG_DELTA", "on")
    if v not in ("on", "off"):
        raise ValueError(f"DIT4BIT_CFG_DELTA={v!r}: choose on or off")
    return v == "on"


def set_cfg_delta(model, on):
    """Turns the null half's difference codes on/off in every quantized layer (QuantLinear and
    its integer form)."""
    for m in model.modules():
        if hasattr(m, "cfg_delta"):
            m.cfg_delta = on


def pair_codes(layer):
    """Whether `layer` codes the null half of this CFG batch as a difference. The sampler uses
    e_u + s (e_c − e_u): rounding errors the halves do not share are multiplied by s − 1 (3 at
    CFG 4.0). Coding x̃_u as Q(x̃_c) + Q(x̃_u − x̃_c) makes the halves share Q(x̃_c)'s error; only
    the rounding of their small difference is left in e_c − e_u. The same two int GEMMs. Needs
    per-token steps (a static step fitted to x̃ does not fit the difference)."""
    return layer.cfg_pair and layer.cfg_delta and layer.a_scale is None


#################################################################################
#                                 QuantLinear                                    #
#################################################################################

class QuantLinear(nn.Module):
    """A linear layer with an exact input transform, weight/activation quantizers and low-rank
    branch. hadamard: "none", "double" (x Hᵀ online, W Hᵀ offline) or "single" (HQ-DM: x is
    quantized in the Hadamard domain and rotated back, W stays unrotated)."""
    def __init__(self, linear, wq=None, aq=None, center="none", channel_scale=None,
                 hadamard="none", block=None, signs=None, static_mean=None):
        super().__init__()
        if hadamard not in HADAMARD:
            raise ValueError(f"unknown hadamard {hadamard!r}: {', '.join(HADAMARD)}")
        if center not in CENTER:
            raise ValueError(f"unknown centering {center!r}: {', '.join(CENTER)}")
        if center == "static" and static_mean is None:
            raise ValueError("static centering needs a calibrated mean")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.wq, self.aq, self.center, self.hadamard, self.block = wq, aq, center, hadamard, block
        self.rotate, self.single = hadamard != "none", hadamard == "single"
        W = linear.weight.detach().float()  # (N, K)
        own = lambda t: None if t is None else t.detach().float().clone()
        self.register_buffer("channel_scale", own(channel_scale))  # s
        self.register_buffer("signs", own(signs))
        self.register_buffer("mu_static", own(static_mean))
        if self.channel_scale is not None:
            # exercise hadanorm: fold the channel scale into W, W diag(s); center and scale x in transform_input
            W = W * self.channel_scale  # W diag(s)
            # end exercise hadanorm
        if hadamard == "double":
            W = hadamard_transform(W, block=block, signs=self.signs)  # W diag(s) Hᵀ
        self.weight = nn.Parameter(W, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(own(linear.bias), requires_grad=False)
        self.register_buffer("w_scale", None)
        self.register_buffer("w_zero", None)
        self.lora_u = self.lora_v = None
        self.quantize_enabled = True
        self.input_prescaled = False  # DiTAS: x / s already folded into the producing layer
        static, clip = aq is not None and not aq.dynamic, aq is not None and aq.clip
        # per timestep bucket: static steps, or (clip) learned ratios, 1 = per-token min-max
        self.register_buffer("a_scale", torch.ones(aq.buckets) if static else None)
        self.register_buffer("a_clip", torch.ones(aq.buckets) if clip else None)
        self.t_bucket = None  # (N,) bucket of each sample, set by the model's timestep hook
        self.buckets = aq.buckets if aq is not None else 1
        # CFG: while dit.forward_with_cfg runs, cfg_pair is set and (cfg_delta) the null half is
        # coded as its difference from the conditional half (`pair_codes`)
        self.cfg_pair, self.cfg_delta = False, cfg_delta_default()
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
        s = None if self.input_prescaled else self.channel_scale
        return transform_input(x, self.center, self.mu_static, s, self.rotate, self.block, self.signs)

    def act_step(self, xt):
        """The activation step of each token (`act_step` below), from its sample's timestep bucket."""
        return act_step(xt, self.aq.bits, self.a_clip, self.a_scale, self.t_bucket)

    def act_quant(self, xt):
        if self.aq is None or not self.quantize_enabled:
            return xt
        if self.aq.dynamic and self.a_clip is None:
            return fake_quant(xt, self.aq)
        return fake_quant_with(xt, self.act_step(xt), 0.0, self.aq)

    def forward(self, x):
        xt, mu = self.transform_input(x)  # (N, T, K)
        if pair_codes(self) and self.aq is not None and self.quantize_enabled:
            # CFG: [Q(x̃_c); Q(x̃_c) + Q(x̃_u − x̃_c)], the halves share Q(x̃_c)'s rounding
            n = len(xt) // 2
            xq = self.act_quant(torch.cat([xt[:n], xt[n:] - xt[:n]]))
            xq = torch.cat([xq[:n], xq[:n] + xq[n:]])
        else:
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
        return hadamard_transform(x, inverse=True, block=self.block, signs=self.signs)

    def extra_repr(self):
        t = [f"center={self.center}"] * (self.center != "none") + \
            ["scale"] * (self.channel_scale is not None) + \
            [f"hadamard={self.hadamard}" + (f"(block={self.block})" if self.block else "")] * self.rotate
        q = lambda c: "fp" if c is None else f"{'s' if c.symmetric else 'a'}{c.bits}/{c.granularity}/{c.range}"
        return f"{self.in_features}->{self.out_features}, W {q(self.wq)}, A {q(self.aq)}, transform [{', '.join(t)}]"


def quant_layers(model):
    """(name, parent, attr, module) of every layer that quantization replaces, in block order."""
    return [(f"blocks.{i}.{path}", blk.get_submodule(path.split(".")[0]), path.split(".")[1],
             blk.get_submodule(path)) for i, blk in enumerate(model.blocks) for path in QUANT_LAYERS]


@dataclass
class Recipe:
    """A quantization method as data: what `quantize_model` builds every QuantLinear from."""
    method: str  # its name, e.g. "hadanorm", "svdquant-hadanorm+a8", "hqdm-single"
    wq: QConfig = None  # weights (None: float)
    aq: QConfig = None  # activations (None: float)
    center: str = "none"  # one of CENTER
    hadamard: str = "none"  # one of HADAMARD
    block: int = None  # block-diagonal Hadamard of this size (None: the whole K)
    signs_seed: int = None  # random ±1 signs before the Hadamard (QuaRot), from this seed
    scales: dict = field(default_factory=dict)  # layer name -> channel scale s (K,)
    means: dict = field(default_factory=dict)  # layer name -> calibrated mean (center="static")
    layer_abits: dict = field(default_factory=dict)  # layer name -> its own activation bits
    prescaled: list = field(default_factory=list)  # DiTAS: layers whose x / s the producer folds
    lora_rank: int = 0  # DiTAS: rank of the LoRA fitted to the weight's quantization error
    lora_iters: int = 10  # ... and its alternations
    lowrank: int = 0  # SVDQuant: rank of the float branch taken out of W before quantizing
    lowrank_iters: int = 1  # ... and its rounds of refinement (SVDQuant's code; 1: plain SVD)
    alpha: float = 0.5  # the smoothing exponent the scales were made with, or "search" (a record)
    alphas: dict = field(default_factory=dict)  # each layer's searched α (a record)
    init: str = None  # QAT: the PTQ recipe it started from (a record)
    integer: bool = False  # saved in the integer form (set by save_quantized)

    def __post_init__(self):
        if self.center not in CENTER or self.hadamard not in HADAMARD:
            raise ValueError(f"recipe {self.method!r}: center is one of {CENTER} and hadamard one of {HADAMARD}, got {self.center!r} and {self.hadamard!r}")
        if self.center == "static" and not self.means:
            raise ValueError(f"recipe {self.method!r}: static centring needs calibrated means")
        if min(self.lora_rank, self.lowrank, self.lora_iters) < 0 or (self.block or 1) < 1:
            raise ValueError(f"recipe {self.method!r}: ranks, iterations and block must be >= 0")
        if self.layer_abits and self.aq is None:
            raise ValueError(f"recipe {self.method!r}: per-layer activation bits need an aq")

    def to_dict(self):
        """Plain types only (QConfigs as dicts), so a checkpoint loads with weights_only=True."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        for k in ("wq", "aq"):
            d[k] = None if d.get(k) is None else QConfig(**d[k])
        if unknown := set(d) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}")
        return cls(**d)


def quantize_model(model, recipe):
    """Swaps qkv/proj/fc1/fc2 of every block for QuantLinears built from `recipe` (a Recipe).
    Returns the model (changed in place)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"quantize_model takes a quant.Recipe, got {type(recipe).__name__}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized; quantize the full-precision model instead")
    r = recipe
    for name, parent, attr, lin in quant_layers(model):
        signs = None if r.signs_seed is None else random_signs(lin.in_features, r.signs_seed)
        aq = r.aq  # mixed precision: this layer's own activation bits
        if name in r.layer_abits:
            aq = dataclasses.replace(aq, bits=r.layer_abits[name])
        q = QuantLinear(lin, r.wq, aq, r.center, r.scales.get(name), r.hadamard, r.block, signs,
                        r.means.get(name))
        q.input_prescaled = name in r.prescaled
        setattr(parent, attr, q.to(lin.weight.device))
    attach_timestep_hook(model)
    return model


def attach_timestep_hook(model):
    """Per-timestep activation scales (static) and clipping ratios (clip) need each sample's
    timestep: a pre-hook on the timestep embedder (called on every forward, CFG included) hands
    every layer that has them its bucket, t * buckets // 1000. Not on the DiT itself:
    forward_with_cfg calls self.forward directly. The layers are listed on the embedder, so a deep
    copy of the model updates its own layers."""  # important!
    emb = model.t_embedder
    emb.bucket_users = [m for m in model.modules()  # QuantLinear and its integer form
                        if getattr(m, "a_scale", None) is not None
                        or getattr(m, "a_clip", None) is not None]
    if emb.bucket_users and getattr(emb, "bucket_hook", None) is None:
        emb.bucket_hook = emb.register_forward_pre_hook(_set_buckets)


def _set_buckets(emb, args):
    t = args[0]  # (N,) original timesteps 0..999
    for q in emb.bucket_users:
        q.t_bucket = (t.long() * q.buckets // 1000).clamp(0, q.buckets - 1)


def set_quantization(model, enabled):
    """Turns fake quantization on/off everywhere (the transform stays: it is exact)."""
    for q in (m for m in model.modules() if isinstance(m, QuantLinear)):
        q.quantize_enabled = enabled


def lesson_activations(n=8, steps=10, block=3):
    """Inputs of block `block`'s four linears while the shipped model samples (DDIM, CFG 1.5)."""
    names = [f"blocks.{block}.{n_}" for n_ in QUANT_LAYERS]
    acts = record_inputs(dit.load_checkpoint(dit.DEFAULT_CKPT)[0], names, n, steps)
    return {k.split(".", 2)[2]: v for k, v in acts.items()}  # "attn.qkv" -> (tokens, K)


def main():
    ap = common.Parser(description="Lesson: activation quantization error (SQNR, dB) of the shipped model's real activations at 8/4/3 bits, per tensor vs per token vs per group.")
    ap.add_argument("--n", type=common.POSITIVE, default=8, help="images sampled to collect activations")
    ap.add_argument("--steps", type=common.POSITIVE, default=10, help="DDIM steps")
    ap.add_argument("--block", type=common.number(int, 0), default=3)
    args = ap.parse_args()
    acts = lesson_activations(args.n, args.steps, args.block)
    print(f"SQNR (dB, higher is better) of Q(x) for the inputs x of block {args.block}'s linears, {args.n} images x {args.steps} DDIM steps of {dit.DEFAULT_CKPT}:")
    print(f"{'bits':>4s} {'granularity':16s}" + "".join(f"{k:>10s}" for k in acts))
    for bits in (8, 4, 3):
        for g, kw in (("per tensor", dict(granularity="tensor")), ("per token", {}),
                      ("per group of 32", dict(granularity="group", group_size=32))):
            row = [sqnr(x, fake_quant(x, QConfig(bits, **kw))) for x in acts.values()]
            print(f"{bits:4d} {g:16s}" + "".join(f"{v:10.2f}" for v in row))
    print("each bit is worth ~6 dB; finer scales help most where a few channels or tokens are outliers")

if __name__ == "__main__":
    common.run_cli(main)
