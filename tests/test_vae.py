"""vae.py: loads a synthetic diffusers-keyed state dict and decodes 4x32x32 -> 3x256x256."""
import pytest
import torch

import vae


def diffusers_state_dict(old_names=True, conv_attention=False):
    """What AutoencoderKL's diffusion_pytorch_model.bin holds: our decoder's keys (old attention
    names), plus encoder / quant_conv keys that the decoder must ignore."""
    torch.manual_seed(0)
    sd = {}
    new_to_old = {v: k for k, v in vae.OLD_ATTENTION_NAMES.items()}
    for k, v in vae.VAEDecoder().state_dict().items():
        if "attentions" in k and old_names:
            for new, old in new_to_old.items():
                k = k.replace(f".{new}.", f".{old}.")
            if conv_attention and v.dim() == 2:
                v = v[:, :, None, None]
        sd[k] = v
    sd["encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    return sd


@pytest.mark.parametrize("old_names,conv_attention", [(True, False), (True, True), (False, False)])
def test_loads_diffusers_keys_and_decodes_to_256px(tmp_path, old_names, conv_attention):
    sd = diffusers_state_dict(old_names, conv_attention)
    torch.save(sd, tmp_path / "vae.bin")
    model = vae.load_vae(str(tmp_path / "vae.bin"))
    q = sd["decoder.mid_block.attentions.0.query.weight" if old_names else "decoder.mid_block.attentions.0.to_q.weight"]
    torch.testing.assert_close(model.decoder.mid_block.attentions[0].to_q.weight,
                               q.reshape(512, 512))
    if not conv_attention and old_names:  # decoding is the same for every variant: do it once
        x = model.decode(torch.randn(1, 4, 32, 32))
        assert x.shape == (1, 3, 256, 256) and x.abs().max() <= 1


def test_missing_key_is_a_readable_error(tmp_path):
    sd = diffusers_state_dict()
    del sd["decoder.conv_out.weight"]
    torch.save(sd, tmp_path / "vae.bin")
    with pytest.raises(ValueError, match="1 missing keys.*conv_out"):
        vae.load_vae(str(tmp_path / "vae.bin"))
