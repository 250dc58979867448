"""Every released checkpoint layout loads and gives the same logits: PVTv2 as the authors (whai362/PVT), timm and
Hugging Face transformers name it, ViT / DeiT from transformers, and the clear refusal of a pickled nn.Module."""
from __future__ import annotations

import re

import pytest
import torch

import dynavit
from dynavit.checkpoint import load_checkpoint, load_state_dict, rename_key
from dynavit.errors import CheckpointError

torch.set_num_threads(1)
DEPTHS_B0 = (2, 2, 2, 2)


def official_keys(depths, sr_ratios=(8, 4, 2, 1)) -> set:
    """The state-dict keys of whai362/PVT classification/pvt_v2.py (read with the search tool): per stage i,
    `patch_embed{i}.{proj,norm}`, `block{i}.{j}.{norm1, attn.{q,kv,proj[,sr,norm]}, norm2,
    mlp.{fc1, dwconv.dwconv, fc2}}`, `norm{i}`; then `head`."""
    keys = set()
    wb = ("weight", "bias")
    for i, depth in enumerate(depths, start=1):
        keys |= {f"patch_embed{i}.{m}.{p}" for m in ("proj", "norm") for p in wb}
        keys |= {f"norm{i}.{p}" for p in wb}
        for j in range(depth):
            mods = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            if sr_ratios[i - 1] > 1:
                mods += ["attn.sr", "attn.norm"]
            keys |= {f"block{i}.{j}.{m}.{p}" for m in mods for p in wb}
    return keys | {"head.weight", "head.bias"}


def timm_keys(depths, sr_ratios=(8, 4, 2, 1)) -> set:
    """timm/models/pvt_v2.py: `patch_embed.{proj,norm}`, `stages.{s}.downsample.{proj,norm}` (s > 0),
    `stages.{s}.blocks.{j}.{norm1, attn.{q,kv,proj[,sr,norm]}, norm2, mlp.{fc1,dwconv,fc2}}`, `stages.{s}.norm`."""
    wb = ("weight", "bias")
    keys = {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in wb} | {"head.weight", "head.bias"}
    for s, depth in enumerate(depths):
        if s > 0:
            keys |= {f"stages.{s}.downsample.{m}.{p}" for m in ("proj", "norm") for p in wb}
        keys |= {f"stages.{s}.norm.{p}" for p in wb}
        for j in range(depth):
            mods = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv", "mlp.fc2"]
            if sr_ratios[s] > 1:
                mods += ["attn.sr", "attn.norm"]
            keys |= {f"stages.{s}.blocks.{j}.{m}.{p}" for m in mods for p in wb}
    return keys


def to_official(sd: dict) -> dict:
    """Our (timm) keys -> the authors' (the inverse of the load-time renaming, written independently here)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        k = k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        out[k] = v
    return out


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_pvt_v2_timm_keys_are_ours():
    model = dynavit.create_model("pvt_v2_b0")
    assert set(model.state_dict()) == timm_keys(DEPTHS_B0)
    assert len(model.state_dict()) == 178


@pytest.mark.parametrize("name,depths", [("pvt_v2_b0", DEPTHS_B0), ("pvt_v2_tiny", DEPTHS_B0)])
def test_pvt_v2_official_layout_loads_with_same_logits(name, depths, tmp_path):
    src = dynavit.create_model(name).eval()
    official = to_official(src.state_dict())
    assert set(official) == official_keys(depths)
    path = tmp_path / "pvt_v2_official.pth"
    torch.save({"model": official}, path)  # the authors' training script wraps weights in {'model': ...}
    dst = dynavit.create_model(name)
    load_checkpoint(dst, path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(src, x), _logits(dst, x))


def test_pvt_v2_official_layout_loads_into_dit():
    """DiT starts from PVTv2 weights: the authors' PVTv2 keys fill every PVTv2 tensor of the DiT twin."""
    src = dynavit.create_model("pvt_v2_tiny")
    dit = dynavit.create_model("dit_tiny")
    report = load_state_dict(dit, to_official(src.state_dict()), strict=False)
    assert not report.unexpected and not report.mismatched
    assert not set(src.state_dict()) & set(report.missing)  # every PVTv2 tensor loaded
    assert all(k.startswith("gates") for k in report.missing)  # only DiT's own (gate) parameters left


def test_pvt_v2_transformers_model_gives_same_logits():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: the Hugging Face "
                                       "PVTv2 model itself cannot be built here")
    cfg = transformers.PvtV2Config(hidden_sizes=[32, 64, 160, 256], depths=list(DEPTHS_B0),
                                   num_attention_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1],
                                   num_labels=1000)
    torch.manual_seed(0)
    hf = transformers.PvtV2ForImageClassification(cfg).eval()
    sd = hf.state_dict()
    assert any(k.startswith("pvt_v2.encoder.layers.") for k in sd) and len(sd) == 194  # key / value separate
    ours = dynavit.create_model("pvt_v2_b0")
    load_state_dict(ours, sd)  # strict
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    # transformers uses LayerNorm eps 1e-6 in the patch embeddings and SR norms where the authors use 1e-5
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=1e-4)
    base = transformers.PvtV2Model(cfg).eval()  # the backbone alone: keys without the 'pvt_v2.' prefix
    load_state_dict(ours, base.state_dict(), strict=False)
    with torch.no_grad():
        last = base(pixel_values=x).last_hidden_state  # (B, C, H, W)
    torch.testing.assert_close(ours.eval().forward_features(x)[-1], last, atol=1e-5, rtol=1e-4)


def test_pvt_v2_transformers_layout_without_value_is_a_clear_error():
    from dynavit.models.pvt_v2 import convert_pvt_v2_state_dict

    sd = {"pvt_v2.encoder.layers.0.blocks.0.attention.key.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="key and value"):
        convert_pvt_v2_state_dict(sd)


@pytest.mark.parametrize("distilled", [False, True])
def test_vit_deit_transformers_model_gives_same_logits(distilled):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: the Hugging Face "
                                       "ViT / DeiT model itself cannot be built here")
    kw = dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
              intermediate_size=192, layer_norm_eps=1e-6, num_labels=10, hidden_act="gelu")
    torch.manual_seed(0)
    if distilled:
        hf = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**kw)).eval()
    else:
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).eval()
    ours = dynavit.create_model("vit", img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3,
                                num_classes=10, distilled=distilled)
    report = load_state_dict(ours, hf.state_dict())
    assert "Hugging Face ViT/DeiT names -> timm names" in report.converted
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wrap", [False, True])
def test_pickled_module_is_refused_with_how_to_convert(tmp_path, wrap):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    path = tmp_path / "whole_model.pth"
    torch.save({"model": model, "epoch": 3} if wrap else model, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(dynavit.create_model("tiny_vit"), path)
    msg = str(e.value)
    assert "pickled nn.Module" in msg and "torch.nn.modules.container.Sequential" in msg
    assert "state_dict()" in msg and "weights_only=False" in msg and "whole_model_state_dict.pth" in msg


class Odd:  # a plain Python object: refused by weights_only, but not an nn.Module
    pass


def test_other_unsafe_pickle_keeps_generic_refusal(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"x": Odd(), "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="beyond plain tensors"):
        load_checkpoint(dynavit.create_model("tiny_vit"), path)


def test_rename_key_first_rule_or_every_rule():
    rules = [(r"^a\.", "b."), (r"^b\.", "c."), (r"\.x$", ".y")]
    assert rename_key("a.x", rules) == "b.x"  # the first matching rule only (exclusive prefixes)
    assert rename_key("z.x", rules) == "z.x"  # rules match at the start of the key
    assert rename_key("a.x", rules, first_only=False) == "c.y"  # every rule in turn (chained renames)
