"""The Diffusion Transformer (DiT) of Peebles & Xie, re-written without timm.

Bit-compatible with facebookresearch/DiT `models.py`: same module names (so official state dicts
load with strict=True), same init, same pos-embed layout, same adaLN-Zero blocks and the same
`forward_with_cfg` quirk (guidance on the first 3 channels only, unless told otherwise).

    python dit.py            # parameter count of every config + the tiny model's summary
"""
import argparse
import contextlib
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels         #
#################################################################################

class PatchEmbed(nn.Module):
    """Image to patch tokens: one strided conv (timm's PatchEmbed without the extras)."""
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoid [cos, sin] then a 2-layer MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32) / half
        freqs = torch.exp(-math.log(max_period) * exponents).to(t.device)
        args = t[:, None].float() * freqs[None]  # (N, half)
        # important! cos first, as official
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, D); the cast lets a bf16 model run


class LabelEmbedder(nn.Module):
    """Embeds class labels; the extra row `num_classes` is the null class used by CFG."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with timm's module names (qkv, proj)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class Mlp(nn.Module):
    """Transformer MLP: fc1 -> GELU(tanh) -> fc2, timm's names."""
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        # important! chunk order is shift, scale, gate for attention, then the same for the MLP
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then a linear map back to patch pixels."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                     learn_sigma=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, a buffer-like parameter (official keeps it in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1],
                                      int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # patch embed like nn.Linear (not nn.Conv2d)
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # important! adaLN-Zero: every block starts as the identity, the output layer as zero
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x, t, y):
        # (N, T, D); the casts (in and out) let a bf16 model run under a float32 sampler
        x = self.x_embedder(x.to(self.pos_embed.dtype)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x).float()  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """Classifier-free guidance: batch = [cond half, uncond half] of the same noise.

        The official code guides only the first 3 channels (a quirk kept for reproducibility);
        `guide_channels=None` guides all of the ε channels.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        with cfg_pairs(self):
            out = self.forward(combined, t, y)
        n_eps = self.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :n_eps], out[:, n_eps:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


@contextlib.contextmanager
def cfg_pairs(model):
    """While open, `model`'s batches are CFG pairs [cond half; null half] of the same x_t: layers
    with a `cfg_pair` flag (quant.py's and integer.py's) code the null half against the
    conditional one (quant.pair_codes). The sampler's forward_with_cfg and QAT's both halves use it."""
    layers = [m for m in model.modules() if hasattr(m, "cfg_pair")]
    for m in layers:
        m.cfg_pair = True
    try:
        yield model
    finally:  # important! a plain forward after this codes each sample on its own again
        for m in layers:
            m.cfg_pair = False


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) table; computed in float64, width coordinate first (official)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # important! w goes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])  # (T, D/2)
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])  # (T, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (T, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D), [sin, cos]


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

def DiT_XL_2(**kw): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kw)
def DiT_XL_4(**kw): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kw)
def DiT_XL_8(**kw): return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kw)
def DiT_L_2(**kw): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kw)
def DiT_L_4(**kw): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kw)
def DiT_L_8(**kw): return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kw)
def DiT_B_2(**kw): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kw)
def DiT_B_4(**kw): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kw)
def DiT_B_8(**kw): return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kw)
def DiT_S_2(**kw): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kw)
def DiT_S_4(**kw): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kw)
def DiT_S_8(**kw): return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kw)


# Our default: Fashion-MNIST 32x32x1, 10 classes, predicts ε only. Width 192 = 12*16 is not a
# power of two on purpose, so the Paley-based Hadamard path is exercised, as DiT-S/B/XL need.
TINY_DEFAULTS = dict(input_size=32, in_channels=1, num_classes=10, learn_sigma=False)


def DiT_T_4(**kw):
    return DiT(**{"depth": 6, "hidden_size": 192, "patch_size": 4, "num_heads": 3, **TINY_DEFAULTS,
                  **kw})


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-T/4": DiT_T_4,
}
TINY = "DiT-T/4"
DEFAULT_CKPT = "checkpoints/dit_t4.pt"  # the shipped tiny model (EMA, fp16)


def build(name, **kw):
    """Builds a named config; unknown names raise ValueError listing the known ones."""
    if name not in DiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(DiT_models)}")
    return DiT_models[name](**kw)


#################################################################################
#                               Checkpoint loading                              #
#################################################################################

def load_state_dict_checked(model, sd, source="checkpoint"):
    """Loads `sd` into `model` after asserting every key and shape, with a readable message."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing: parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if extra: parts.append(f"{len(extra)} unexpected keys (e.g. {extra[:3]})")
        if shapes: parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return model


def load_official(path, config="DiT-XL/2", image_size=256):
    """A facebookresearch/DiT checkpoint -> model (ImageNet: latent input_size = image_size / 8).

    Accepts the released bare state dicts (DiT-XL-2-256x256.pt) and train.py's dicts ({"model",
    "ema", ...}: the EMA weights are taken, as the official sample.py does). Every key and shape is
    checked.
    """
    # train.py's "args"
    sd = common.load_file(path, "official checkpoint", allow=(argparse.Namespace,))
    if isinstance(sd, dict) and isinstance(sd.get("ema"), dict):
        sd = sd["ema"]
    elif isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    if image_size % 8:
        raise ValueError(f"image size {image_size} is not a multiple of 8 (the VAE's downsampling)")
    model = build(config, input_size=image_size // 8)
    load_state_dict_checked(model, sd, f"{path} (as {config} at {image_size}px)")
    return model.eval()


def save_checkpoint(path, model, config, **extra):
    """Saves our own checkpoint: half-precision weights + the config that rebuilds the model."""
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    # a crash never leaves half a file
    common.atomic_save({"model": sd, "config": dict(config), **extra}, path)


def load_checkpoint(path):
    """Loads one of our checkpoints -> (model in float32 eval mode, config dict)."""
    ckpt = common.load_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a dit4bit checkpoint (needs 'model' and 'config' entries)")
    if "recipe" in ckpt:
        raise ValueError(f"{path} holds an already-quantized model ({ckpt['recipe'].get('method')}); pass the full-precision checkpoint")
    cfg = dict(ckpt["config"])
    model = build(cfg["model"], **{k: v for k, v in cfg.items() if k != "model"})
    common.check_finite(ckpt["model"], path)
    load_state_dict_checked(model, ckpt["model"], source=path)
    return model.float().eval(), cfg


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    ap = common.Parser(description="Print every DiT config's parameter count and the tiny model's summary.")
    ap.add_argument("--model", default=None, help="only this config")
    args = ap.parse_args()
    names = [args.model] if args.model else list(DiT_models)
    if args.model and args.model not in DiT_models:
        build(args.model)  # raises the error that lists the known configs
    print(f"{'config':10s} {'params':>14s} {'depth':>5s} {'width':>5s} {'heads':>5s} {'patch':>5s}")
    for name in names:
        with torch.device("meta"):  # no memory or init cost, shapes only
            m = build(name)
        blk = m.blocks[0]
        print(f"{name:10s} {count_params(m):14,d} {len(m.blocks):5d} {blk.attn.qkv.in_features:5d} {m.num_heads:5d} {m.patch_size:5d}")
    shape_walk()


@torch.no_grad()
def shape_walk(path=DEFAULT_CKPT):
    """Lesson: the tensor shapes through one forward of the shipped tiny model (random init if
    absent)."""
    m = load_checkpoint(path)[0] if os.path.exists(path) else build(TINY)
    src = path if os.path.exists(path) else "random init"
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([999, 500]), torch.tensor([0, 9])
    print(f"\n{TINY} ({src}): {count_params(m):,d} params, {m.x_embedder.num_patches} tokens of width {m.pos_embed.shape[-1]}; one forward, batch 2:")
    h = m.x_embedder(x) + m.pos_embed  # (N, T, D)
    c = m.t_embedder(t) + m.y_embedder(y, False)  # (N, D): the condition every block's adaLN reads
    rows = [("input x_t", x), ("patchify + pos-embed", h), ("timestep + class embedding c", c),
            ("adaLN(c): 6 shifts/scales/gates", m.blocks[0].adaLN_modulation(c))]
    for blk in m.blocks:
        h = blk(h, c)  # (N, T, D)
    out = m.final_layer(h, c)  # (N, T, p*p*C)
    rows += [(f"after {len(m.blocks)} DiT blocks", h), ("final layer", out),
             ("unpatchify: predicted noise", m.unpatchify(out))]
    for name, v in rows:
        print(f"  {name:32s} {tuple(v.shape)}")


if __name__ == "__main__":
    common.run_cli(main)
