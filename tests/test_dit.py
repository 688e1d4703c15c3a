"""dit.py: official key/shape layout, parameter counts, shapes, CFG and checkpoint handling."""
import pytest
import torch

import dit


def xl2_expected_shapes(D=1152, depth=28, p=2, C=4, T=256, classes=1000, out=8):
    """The official DiT-XL/2 state dict, written out from the paper's architecture."""
    s = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, p, p),
         "x_embedder.proj.bias": (D,),
         "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
         "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
         "y_embedder.embedding_table.weight": (classes + 1, D),
         "final_layer.linear.weight": (p * p * out, D), "final_layer.linear.bias": (p * p * out,),
         "final_layer.adaLN_modulation.1.weight": (2 * D, D),
             "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                  b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                  b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                  b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
                  b + "adaLN_modulation.1.weight": (6 * D, D),
                      b + "adaLN_modulation.1.bias": (6 * D,)})
    return s


def test_xl2_has_the_official_292_keys_and_parameter_count():
    with torch.device("meta"):
        m = dit.DiT_models["DiT-XL/2"]()
    sd = m.state_dict()
    assert len(sd) == 292
    assert {k: tuple(v.shape) for k, v in sd.items()} == xl2_expected_shapes()
    assert dit.count_params(m) == 674_834_720
    assert m.pos_embed.numel() == 256 * 1152 and not m.pos_embed.requires_grad


def test_s2_key_and_shape_list():
    with torch.device("meta"):
        m = dit.DiT_models["DiT-S/2"]()
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == xl2_expected_shapes(D=384, depth=12)
    assert dit.count_params(m) == 32_865_056  # 33M in the paper's table


@pytest.mark.parametrize("learn_sigma,out_c", [(True, 8), (False, 4)])
def test_output_shapes(learn_sigma, out_c):
    m = dit.DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=48, depth=1, num_heads=2,
                num_classes=5, learn_sigma=learn_sigma)
    out = m(torch.randn(3, 4, 16, 16), torch.tensor([0, 5, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, out_c, 16, 16)


def test_tiny_default_is_fashion_mnist_and_not_a_power_of_two():
    m = dit.build(dit.TINY)
    D = m.blocks[0].attn.qkv.in_features
    assert D & (D - 1) != 0 and D % 12 == 0
    assert m(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 9])).shape == (2, 1, 32, 32)


def test_pos_embed_layout_width_first_sin_then_cos():
    m = dit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                num_classes=2)
    pe = m.pos_embed[0]  # (16 tokens, 16): token = h * 4 + w
    q = 16 // 4  # each of [sin(w), cos(w), sin(h), cos(h)] is a quarter
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    tok = 1 * 4 + 3  # h = 1, w = 3
    want = torch.cat([torch.sin(3 * omega), torch.cos(3 * omega), torch.sin(1 * omega),
                      torch.cos(1 * omega)])
    torch.testing.assert_close(pe[tok].double(), want, atol=1e-6, rtol=0)


def test_timestep_embedding_is_cos_then_sin():
    e = dit.TimestepEmbedder.timestep_embedding(torch.tensor([0.0]), 8)
    torch.testing.assert_close(e, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))


def test_adaln_zero_init_outputs_zero():
    m = dit.build(dit.TINY, depth=2)
    assert m(torch.randn(2, 1, 32, 32), torch.tensor([3, 4]), torch.tensor([1, 2])).abs().max() == 0


def test_cfg_null_class_and_guidance():
    torch.manual_seed(0)
    m = dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                num_classes=3, learn_sigma=True).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    assert m.y_embedder.embedding_table.num_embeddings == 4  # null class = num_classes
    dropped = m.y_embedder.token_drop(torch.tensor([0, 1, 2]),
                                      force_drop_ids=torch.tensor([1, 0, 1]))
    assert dropped.tolist() == [3, 1, 3]
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x[:1], x[:1]])
    t, y = torch.tensor([10, 10]), torch.tensor([2, 3])
    with torch.no_grad():
        cond, uncond = m(x, t, y)[:1], m(x, t, y)[1:]
        out3 = m.forward_with_cfg(x, t, y, 4.0)
        out_all = m.forward_with_cfg(x, t, y, 4.0, guide_channels=None)
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out3[0, :3], guided[0, :3])
    torch.testing.assert_close(out3[0, 3:4], cond[0, 3:4])  # official quirk: channel 3 unguided
    torch.testing.assert_close(out_all[0, :4], guided[0, :4])
    torch.testing.assert_close(out3[0, 4:], cond[0, 4:])  # learned σ half untouched


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model config 'DiT-Q/2'"):
        dit.build("DiT-Q/2")


def test_checkpoint_round_trip_and_errors(tmp_path, tiny_ckpt):
    m, cfg = dit.load_checkpoint(tiny_ckpt)
    assert cfg["model"] == dit.TINY and next(m.parameters()).dtype == torch.float32
    with pytest.raises(FileNotFoundError):
        dit.load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        dit.load_checkpoint(str(bad))
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["config"] = {"model": dit.TINY, "depth": 2}  # claims 2 blocks, holds 1
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing keys"):
        dit.load_checkpoint(str(tmp_path / "other.pt"))
    ck["config"] = {"model": "DiT-S/2"}
    torch.save(ck, tmp_path / "s2.pt")
    with pytest.raises(ValueError, match="does not fit"):
        dit.load_checkpoint(str(tmp_path / "s2.pt"))


def test_load_official_bare_and_train_dicts_and_readable_errors(tmp_path):
    torch.manual_seed(0)
    m = dit.DiT_models["DiT-S/8"](input_size=8)  # official key layout at a small size (64px images)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    sd = m.state_dict()
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": None},
               tmp_path / "train.pt")
    for f in ("bare.pt", "train.pt"):
        got = dit.load_official(str(tmp_path / f), "DiT-S/8", image_size=64)
        assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items())  # the EMA weights
    with pytest.raises(ValueError, match="shape mismatches"):  # a file of another size
        dit.load_official(str(tmp_path / "bare.pt"), "DiT-S/8", image_size=128)
    with pytest.raises(ValueError, match="shape mismatches|missing keys"):  # another config
        dit.load_official(str(tmp_path / "bare.pt"), "DiT-B/8", image_size=64)
    torch.save({k: v for k, v in sd.items() if k != "y_embedder.embedding_table.weight"},
               tmp_path / "miss.pt")
    with pytest.raises(ValueError, match="1 missing keys.*y_embedder"):
        dit.load_official(str(tmp_path / "miss.pt"), "DiT-S/8", image_size=64)
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="1 unexpected keys.*extra.weight"):
        dit.load_official(str(tmp_path / "extra.pt"), "DiT-S/8", image_size=64)


def test_lesson_walks_the_shapes_of_the_shipped_model():
    from conftest import lesson_output
    out = lesson_output("dit.py")
    assert "DiT-XL/2      674,834,720" in out
    assert "patchify + pos-embed             (2, 64, 192)" in out
    assert "unpatchify: predicted noise      (2, 1, 32, 32)" in out
