"""The Stable Diffusion VAE decoder (sd-vae-ft-mse / -ema) in plain torch: latents -> pixels.

Official DiT-XL/2 samples 4×32×32 latents (256px images); this turns them into 3×256×256 pictures.
Module names follow diffusers' `AutoencoderKL`, so its pickled `diffusion_pytorch_model.bin`
loads by key (decoder.*, post_quant_conv.*; the encoder's keys are ignored). Nothing is downloaded:
the user passes the file.

    python vae.py --vae PATH/diffusion_pytorch_model.bin     # decodes a random latent, prints shapes
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dit

LATENT_SCALE = 0.18215  # SD's latent scaling: the DiT samples z, the decoder sees z / 0.18215
CHANNELS = (128, 256, 512, 512)  # block_out_channels of sd-vae-ft-mse
LAYERS = 2  # layers_per_block (the decoder uses LAYERS + 1 resnets per up block)


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut when the width changes."""
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions (the mid block's)."""
    def __init__(self, c):
        super().__init__()
        self.group_norm = norm(c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])[:, 0]
        return x + self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c), ResnetBlock2D(c, c)])
        self.attentions = nn.ModuleList([Attention(c)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout) for i in range(LAYERS + 1)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    """SD VAE decoder: 4 -> 512 channels, mid block, 4 up blocks (x8 spatially), -> 3 channels."""
    def __init__(self, channels=CHANNELS):
        super().__init__()
        rev = list(reversed(channels))  # 512, 512, 256, 128
        self.conv_in = nn.Conv2d(4, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0])
        self.up_blocks = nn.ModuleList([UpBlock(rev[max(i - 1, 0)], rev[i], i < len(rev) - 1) for i in range(len(rev))])
        self.conv_norm_out = norm(rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """post_quant_conv + Decoder, with AutoencoderKL's key names; `decode` takes DiT latents."""
    def __init__(self):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.decoder = Decoder()

    @torch.no_grad()
    def decode(self, latents):
        """DiT latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents / LATENT_SCALE)).clamp(-1, 1)


# diffusers < 0.15 named the attention weights differently; the released .bin files use the old
# names
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load_vae(path):
    """Loads the decoder half of a diffusers AutoencoderKL state dict, asserting keys and shapes."""
    sd = common.load_file(path, "VAE file")
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds no state dict")
    out = {}
    for k, v in sd.items():
        if k.startswith(("encoder.", "quant_conv.")):
            continue  # the encoder half: not needed to decode
        parts = k.split(".")
        if "attentions" in parts and parts[-2] in OLD_ATTENTION_NAMES:
            k = ".".join(parts[:-2] + [OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
        if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) and v.dim() == 4:
            v = v[:, :, 0, 0]  # some exports store the attention projections as 1x1 convs
        out[k] = v
    model = VAEDecoder()
    dit.load_state_dict_checked(model, out, path)
    return model.eval()


def main():
    ap = common.Parser(description="Decode a latent with the SD VAE decoder (plain torch).")
    ap.add_argument("--vae", required=True,
                    help="diffusers diffusion_pytorch_model.bin of sd-vae-ft-mse / -ema")
    ap.add_argument("--size", type=int, default=32, help="latent size (32 -> 256px)")
    args = ap.parse_args()
    vae = load_vae(args.vae)
    z = torch.randn(1, 4, args.size, args.size)
    x = vae.decode(z * LATENT_SCALE)
    print(f"latent {tuple(z.shape)} -> image {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}]; {sum(p.numel() for p in vae.parameters()):,d} decoder parameters")


if __name__ == "__main__":
    common.run_cli(main)
