"""The DiT backbone: shapes, adaLN-Zero initialisation, label dropout, classifier-free guidance."""
import pytest
import torch

from dit_moe.registry import build_model, model_names, parse_name


def tiny(name="DiT-T/2", **kw):
    torch.manual_seed(0)
    opts = dict(input_size=8, in_channels=4, num_classes=10)
    opts.update(kw)
    return build_model(name, **opts)


def randomise_final_layer(model):
    """adaLN-Zero makes a fresh model output zeros; give the output path weights so outputs differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.final_layer.parameters()) + [q for b in model.blocks for q in b.adaLN_modulation.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", [n for n in model_names() if "-E" not in n])
def test_every_dense_name_shapes_on_meta(name):
    """Every registry size builds and propagates shapes/dtypes (meta device: no memory, no compute)."""
    with torch.device("meta"):
        model = build_model(name, input_size=16, in_channels=4, num_classes=1000)
        x = torch.empty(2, 4, 16, 16)
        out = model(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 16, 16)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", ["DiT-T/2", "DiT-T/4", "DiT-T/8"])
def test_forward_real_shapes(name):
    model = tiny(name, input_size=16)
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,)))
    assert out.shape == (3, 8, 16, 16) and out.dtype == torch.float32
    no_sigma = tiny(name, input_size=16, learn_sigma=False)
    assert no_sigma(x, torch.zeros(3), torch.zeros(3, dtype=torch.long)).shape == (3, 4, 16, 16)


def test_adaln_zero_fresh_model_outputs_zeros():
    model = tiny()
    x = torch.randn(4, 4, 8, 8)
    out = model(x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    assert torch.count_nonzero(out) == 0
    # ...because every gate and the final projection start at zero, while the rest does not.
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.attn.qkv.weight) > 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.t_embedder.mlp[0].weight) > 0


def test_label_dropout_rate_and_null_class():
    model = tiny(num_classes=7, class_dropout_prob=0.25)
    emb = model.y_embedder
    assert emb.null_class == 7 and emb.embedding_table.num_embeddings == 8
    torch.manual_seed(0)
    labels = torch.randint(0, 7, (200_000,))
    dropped = emb.token_drop(labels)
    rate = (dropped == 7).float().mean().item()
    assert abs(rate - 0.25) < 0.005
    assert torch.equal(dropped[dropped != 7], labels[dropped != 7])
    forced = emb.token_drop(labels[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [7, labels[1].item(), 7, labels[3].item()]
    # No dropout in eval mode, no null row when dropout is off.
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_label_dropout_only_in_training():
    model = randomise_final_layer(tiny(class_dropout_prob=0.5)).eval()
    x, t, y = torch.randn(8, 4, 8, 8), torch.full((8,), 500), torch.arange(8)
    torch.manual_seed(0)
    a = model(x, t, y)
    torch.manual_seed(1)
    assert torch.equal(a, model(x, t, y))


def test_cfg_scale_one_equals_conditional():
    model = randomise_final_layer(tiny()).eval()
    x, t, y = torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    with torch.no_grad():
        cond = model(x, t, y)
        assert torch.equal(model.forward_with_cfg(x, t, y, 1.0), cond)


def test_cfg_formula_and_channel_options():
    model = randomise_final_layer(tiny()).eval()
    x, t, y = torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        all_ch = model.forward_with_cfg(x, t, y, 4.0)
        legacy = model.forward_with_cfg(x, t, y, 4.0, guidance_channels=3)
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(all_ch[:, :4], guided[:, :4], atol=1e-5)
    assert torch.allclose(all_ch[:, 4:], cond[:, 4:], atol=1e-6)          # variance channels: conditional
    # Legacy: the first 3 channels are guided exactly like the all-channel version; channel 4 is conditional.
    assert torch.allclose(legacy[:, :3], all_ch[:, :3], atol=1e-6)
    assert torch.allclose(legacy[:, 3], cond[:, 3], atol=1e-6)
    assert not torch.allclose(legacy[:, 3], all_ch[:, 3], atol=1e-4)
    assert torch.allclose(legacy[:, 4:], all_ch[:, 4:], atol=1e-6)
    with pytest.raises(ValueError, match="guidance_channels"):
        model.forward_with_cfg(x, t, y, 4.0, guidance_channels=5)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = randomise_final_layer(tiny())
    b = randomise_final_layer(tiny(grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,))
    for m in (a, b):
        m.train()
        torch.manual_seed(3)  # same label dropout
        m(x, t, y).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_pos_embed_is_fixed_sincos():
    model = tiny()
    assert "pos_embed" not in model.state_dict()
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    pe = model.pos_embed[0]
    assert pe.shape == (16, 128)
    assert torch.allclose(pe.abs().max(), torch.tensor(1.0))


def test_parse_name_errors():
    with pytest.raises(ValueError, match="unknown model name"):
        parse_name("DiT-Q/2")
    with pytest.raises(ValueError, match="unknown model name"):
        parse_name("DiT-S/3")
    with pytest.raises(ValueError, match="1 <= K <= E"):
        parse_name("DiT-S/2-E4K8")
    a = parse_name("DiT-B/2-E16K4")
    assert (a.depth, a.hidden_size, a.num_heads, a.num_experts, a.top_k) == (12, 768, 12, 16, 4)
