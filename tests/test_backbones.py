"""Dense backbones against the authors' reference outputs, checkpoint loading and the info contract."""
from __future__ import annotations

import pytest
import torch

import dynavit
from dynavit.errors import CheckpointError, InputError, UnknownNameError

from conftest import DEIT_CFG, LVVIT_CFG, fixture_path


def load_deit(**overrides):
    model = dynavit.create_model("vit", **{**DEIT_CFG, **overrides}).eval()
    dynavit.load_checkpoint(model, fixture_path("deit.safetensors"))
    return model


def load_lvvit(**overrides):
    model = dynavit.create_model("lvvit", **{**LVVIT_CFG, **overrides}).eval()
    dynavit.load_checkpoint(model, fixture_path("lvvit.safetensors"))
    return model


def test_deit_matches_reference(ref, ref_images):
    model = load_deit()
    with torch.no_grad():
        tokens = model.forward_features(ref_images)
        logits = model(ref_images)
    torch.testing.assert_close(logits, ref["deit_logits"], atol=2e-3, rtol=0)
    torch.testing.assert_close(tokens, ref["deit_tokens"], atol=2e-3, rtol=0)


def test_lvvit_matches_reference(ref, ref_images):
    model = load_lvvit()
    with torch.no_grad():
        logits = model(ref_images)
    torch.testing.assert_close(logits, ref["lvvit_logits"], atol=2e-3, rtol=0)


@pytest.mark.parametrize("perturb", ["qkv_bias", "norm_eps", "qkv_order", "residual_scale"])
def test_reference_check_catches_wrong_details(ref, ref_images, perturb):
    """The fixture comparison fails for a wrong bias, norm epsilon, q/k/v order or residual scaling."""
    if perturb == "residual_scale":
        model = load_lvvit(residual_scale=1.0)
        expected = ref["lvvit_logits"]
    elif perturb == "norm_eps":
        model = load_lvvit(norm_eps=1e-6 * 1e5)  # 0.1 instead of 1e-5
        expected = ref["lvvit_logits"]
    else:
        model = load_deit()
        expected = ref["deit_logits"]
        with torch.no_grad():
            qkv = model.blocks[0].attn.qkv
            if perturb == "qkv_bias":
                qkv.bias.zero_()
            else:  # swap q and k rows
                C = qkv.weight.shape[1]
                w = qkv.weight.clone()
                qkv.weight[:C], qkv.weight[C:2 * C] = w[C:2 * C], w[:C]
    with torch.no_grad():
        logits = model(ref_images)
    assert (logits - expected).abs().max() > 2e-3


def test_wrapped_pth_and_prefixes_load(tmp_path, ref, ref_images):
    from safetensors.torch import load_file

    sd = load_file(str(fixture_path("deit.safetensors")))
    for name, obj in {
        "wrapped.pth": {"model": sd, "epoch": 3},
        "ema.pth.tar": {"state_dict_ema": sd},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }.items():
        torch.save(obj, tmp_path / name)
        model = dynavit.create_model("vit", **DEIT_CFG).eval()
        dynavit.load_checkpoint(model, tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(ref_images), ref["deit_logits"], atol=2e-3, rtol=0)


def _to_hf(sd: dict, depth: int) -> dict:
    """timm names -> Hugging Face ViT names (the inverse of the documented mapping)."""
    hf = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
          "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(depth):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                hf[f"vit.encoder.layer.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
            for part, t in zip(("query", "key", "value"), (q, k, v)):
                hf[f"vit.encoder.layer.{i}.attention.attention.{part}.{kind}"] = t.clone()
    return hf


def test_hugging_face_names_load(tmp_path, ref, ref_images):
    from safetensors.torch import load_file, save_file

    hf = _to_hf(load_file(str(fixture_path("deit.safetensors"))), depth=12)
    save_file(hf, str(tmp_path / "hf.safetensors"))
    model = dynavit.create_model("vit", **DEIT_CFG).eval()
    report = dynavit.load_checkpoint(model, tmp_path / "hf.safetensors")
    assert any("Hugging Face" in c for c in report.converted)
    with torch.no_grad():
        torch.testing.assert_close(model(ref_images), ref["deit_logits"], atol=2e-3, rtol=0)


def test_pos_embed_resampled_for_new_size():
    model = dynavit.create_model("vit", **{**DEIT_CFG, "img_size": 384}).eval()
    report = dynavit.load_checkpoint(model, fixture_path("deit.safetensors"))
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 48)
    assert any("pos_embed resampled" in c for c in report.converted)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_pos_embed_resampling_keeps_class_slot_and_is_identity_at_same_grid():
    from dynavit.checkpoint import resample_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 8)
    same = resample_pos_embed(pos, (14, 14), num_prefix=1)
    torch.testing.assert_close(same, pos, atol=1e-5, rtol=0)
    up = resample_pos_embed(pos, (24, 24), num_prefix=1)
    assert up.shape == (1, 1 + 576, 8) and torch.equal(up[:, 0], pos[:, 0])


def test_checkpoint_that_does_not_fit_raises_clear_error():
    model = dynavit.create_model("vit", **{**DEIT_CFG, "embed_dim": 96})
    with pytest.raises(CheckpointError) as e:
        dynavit.load_checkpoint(model, fixture_path("deit.safetensors"))
    msg = str(e.value)
    assert "shape mismatches" in msg and "blocks.0.attn.qkv.weight" in msg and "(144, 48) vs (288, 96)" in msg
    lv = dynavit.create_model("lvvit", **LVVIT_CFG)
    with pytest.raises(CheckpointError, match="missing keys"):
        dynavit.load_checkpoint(lv, fixture_path("deit.safetensors"))
    report = dynavit.load_checkpoint(lv, fixture_path("deit.safetensors"), strict=False)
    assert "aux_head.weight" in report.missing


def test_save_and_reload_roundtrip(tmp_path, ref_images):
    model = dynavit.create_model("tiny_vit").eval()
    path = dynavit.save_checkpoint(model, tmp_path / "m.safetensors", metadata={"model": "tiny_vit"})
    other = dynavit.create_model("tiny_vit").eval()
    dynavit.load_checkpoint(other, path)
    with torch.no_grad():
        torch.testing.assert_close(model(ref_images[:1]), other(ref_images[:1]), atol=0, rtol=0)


def test_dense_return_info_is_empty():
    model = dynavit.create_model("tiny_vit").eval()
    logits, info = model(torch.randn(2, 3, 224, 224), return_info=True)
    assert logits.shape == (2, 10)
    assert info.token_counts == [] and info.patch_to_token == []


def test_distilled_deit_averages_heads():
    model = dynavit.create_model("deit_tiny_distilled_patch16_224", embed_dim=48, num_heads=3, num_classes=5).eval()
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape[1] == 198
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), expected)


def test_registered_variants_have_published_sizes():
    sizes = {"deit_tiny_patch16_224": 5.72, "deit_small_patch16_224": 22.05, "deit_base_patch16_224": 86.57,
             "lvvit_s": 26.15}
    for name, millions in sizes.items():
        model = dynavit.create_model(name)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - millions) < 0.1, (name, n)


def test_dense_deit_uses_fused_attention(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = dynavit.create_model("tiny_vit").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert len(calls) == 12


def test_bad_inputs_raise_clear_errors():
    model = dynavit.create_model("tiny_vit").eval()
    with pytest.raises(InputError, match="224x224"):
        model(torch.randn(1, 3, 192, 192))
    with pytest.raises(InputError, match="3 channels, got 1"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(InputError, match="floating-point"):
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(UnknownNameError, match="deit_small_patch16_224"):
        dynavit.create_model("deit_smal_patch16_224")
    with pytest.raises(dynavit.ConfigError, match="wrong_arg"):
        dynavit.create_model("tiny_vit", wrong_arg=3)


def test_dense_gmacs_match_published_and_analytic():
    from dynavit.flops import vit_block_macs

    model = dynavit.create_model("deit_small_patch16_224")
    gmacs = dynavit.count_gmacs(model)
    assert round(gmacs, 1) == 4.6
    analytic = (12 * vit_block_macs(197, 384) + 196 * 768 * 384 + 384 * 1000) / 1e9
    assert abs(gmacs - analytic) / analytic < 0.01


@pytest.mark.parametrize("name,kw,size,bad_size,size_error", [
    ("tiny_vit", {}, 224, 192, "this model takes 224x224 images, got 192x192; .* img_size=192 .*resamples pos_embed"),
    ("pvt_v2_tiny", {}, 64, 16, "PVTv2 needs images of at least 32x32, got 16x16"),
    ("convnext", dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32]), 64, 16, "ConvNeXt needs images of at least 32x32"),
    ("swin", dict(embed_dim=12, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], img_size=224), 224, 192,
     r"Swin model takes 224x224 images \(its window masks .*\), got 192x192")])
def test_every_backbone_gives_the_same_clear_input_errors(name, kw, size, bad_size, size_error):
    """One shared check (errors.check_image_batch), with each family's size rule as its arguments."""
    model = dynavit.create_model(name, num_classes=10, **kw).eval()
    with pytest.raises(InputError, match=size_error):
        model(torch.randn(1, 3, bad_size, bad_size))
    with pytest.raises(InputError, match="3 channels, got 1"):
        model(torch.randn(1, 1, size, size))
    with pytest.raises(InputError, match="floating-point"):
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    with pytest.raises(InputError, match="4-d image batch"):
        model(torch.randn(3, size, size))


@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_explicit_short_attention_equals_fused(mask_kind):
    """explicit_attention (what short CPU sequences run) has the fused kernel's value and gradients, with an
    additive bias (ToMe's log-size, DynamicViT's padding) or a bool mask (DiT's reached cells)."""
    from dynavit.layers import explicit_attention, fused_is_slower

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, 37, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = None
    if mask_kind == "float":
        mask = torch.randn(4, 1, 1, 37, generator=g).clamp(max=0).masked_fill(torch.arange(37) > 30, float("-inf"))
    elif mask_kind == "bool":
        mask = (torch.arange(37) <= 30).expand(4, 1, 1, 37)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    explicit = explicit_attention(q, k, v, 16 ** -0.5, mask)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    for a, b in zip(torch.autograd.grad(explicit.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fused_is_slower(q, 37) and not fused_is_slower(q[:1], 37)  # batch 1 x 2 heads stays fused
    assert not fused_is_slower(torch.randn(4, 2, 197, 16), 197) and not fused_is_slower(q.double(), 37)


def test_model_output_does_not_depend_on_attention_kernel(monkeypatch):
    """A pruned DeiT's logits are the same whether its short stages run explicit or fused attention."""
    from dynavit import layers
    from dynavit.methods.evit import apply_evit

    torch.manual_seed(0)
    model = apply_evit(dynavit.create_model("tiny_vit"), 0.5).eval()
    x = torch.randn(4, 3, 224, 224)
    calls, real = [], layers.explicit_attention
    monkeypatch.setattr(layers, "explicit_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    with torch.no_grad():
        explicit = model(x)
        assert sorted(set(calls)) == [28, 52, 100]  # EViT 0.5: its last three stages, cls + kept + fused token
        monkeypatch.setattr(layers, "EXPLICIT_MAX_TOKENS", 0)
        fused = model(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_pvt_v2_output_does_not_depend_on_attention_kernel(monkeypatch):
    """PVTv2's short spatial-reduction attentions (explicit on CPU) give the fused kernel's logits."""
    from dynavit import layers

    torch.manual_seed(0)
    model = dynavit.create_model("pvt_v2_tiny", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    calls, real = [], layers.explicit_attention
    monkeypatch.setattr("dynavit.models.pvt_v2.explicit_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        explicit = model(x)
        assert calls  # the explicit path ran
        monkeypatch.setattr("dynavit.models.pvt_v2.EXPLICIT_MAX_QUERIES", 0)
        fused = model(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
