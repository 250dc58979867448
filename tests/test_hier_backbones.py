"""ConvNeXt and Swin load official and timm checkpoint layouts unchanged (docs/dynamic-hierarchical.md), with
clear errors.

The key layouts below are written from the official repositories' module structure (facebookresearch/ConvNeXt,
microsoft/Swin-Transformer) and timm's conversions of them, independently of dynavit's code; the full-size
models are built on the meta device, so no weights are allocated.
"""
from __future__ import annotations

import re

import pytest
import torch

import dynavit
from dynavit.checkpoint import load_state_dict, save_checkpoint
from dynavit.errors import CheckpointError

from test_dynamic_hier import CNN_CFG, SWIN_CFG, timages, tpami, tref  # noqa: F401 (fixtures)


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def official_convnext(depths, dims, classes=1000) -> dict:
    sd = {"downsample_layers.0.0.weight": _t(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": _t(dims[0]),
          "downsample_layers.0.1.weight": _t(dims[0]), "downsample_layers.0.1.bias": _t(dims[0])}
    for i in range(1, 4):
        sd.update({f"downsample_layers.{i}.0.weight": _t(dims[i - 1]), f"downsample_layers.{i}.0.bias": _t(dims[i - 1]),
                   f"downsample_layers.{i}.1.weight": _t(dims[i], dims[i - 1], 2, 2),
                   f"downsample_layers.{i}.1.bias": _t(dims[i])})
    for s, d in enumerate(dims):
        for j in range(depths[s]):
            p = f"stages.{s}.{j}."
            sd.update({p + "gamma": _t(d), p + "dwconv.weight": _t(d, 1, 7, 7), p + "dwconv.bias": _t(d),
                       p + "norm.weight": _t(d), p + "norm.bias": _t(d), p + "pwconv1.weight": _t(4 * d, d),
                       p + "pwconv1.bias": _t(4 * d), p + "pwconv2.weight": _t(d, 4 * d), p + "pwconv2.bias": _t(d)})
    sd.update({"norm.weight": _t(dims[3]), "norm.bias": _t(dims[3]), "head.weight": _t(classes, dims[3]),
               "head.bias": _t(classes)})
    return sd


def timm_convnext(official: dict) -> dict:
    """timm's renaming of the official ConvNeXt keys (its checkpoint_filter_fn)."""
    out = {}
    for k, v in official.items():
        k = k.replace("downsample_layers.0.", "stem.")
        k = re.sub(r"stages\.(\d+)\.(\d+)", r"stages.\1.blocks.\2", k)
        k = re.sub(r"downsample_layers\.(\d+)\.(\d+)", r"stages.\1.downsample.\2", k)
        k = k.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc").replace("head.", "head.fc.")
        if k.startswith("norm."):
            k = "head." + k
        out[k] = v
    return out


def official_swin(embed, depths, heads, window=7, img=224, classes=1000) -> dict:
    grid = img // 4
    sd = {"patch_embed.proj.weight": _t(embed, 3, 4, 4), "patch_embed.proj.bias": _t(embed),
          "patch_embed.norm.weight": _t(embed), "patch_embed.norm.bias": _t(embed)}
    for i, depth in enumerate(depths):
        C, res = embed * 2 ** i, grid // 2 ** i
        w = min(window, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for n in ("norm1", "norm2"):
                sd.update({p + n + ".weight": _t(C), p + n + ".bias": _t(C)})
            sd.update({p + "attn.relative_position_bias_table": _t((2 * w - 1) ** 2, heads[i]),
                       p + "attn.relative_position_index": _t(w * w, w * w, dtype=torch.long),
                       p + "attn.qkv.weight": _t(3 * C, C), p + "attn.qkv.bias": _t(3 * C),
                       p + "attn.proj.weight": _t(C, C), p + "attn.proj.bias": _t(C),
                       p + "mlp.fc1.weight": _t(4 * C, C), p + "mlp.fc1.bias": _t(4 * C),
                       p + "mlp.fc2.weight": _t(C, 4 * C), p + "mlp.fc2.bias": _t(C)})
            if j % 2 == 1 and res > window:  # shifted windows carry their mask as a buffer
                sd[p + "attn_mask"] = _t((res // w) ** 2, w * w, w * w)
        if i < len(depths) - 1:
            sd.update({f"layers.{i}.downsample.reduction.weight": _t(2 * C, 4 * C),
                       f"layers.{i}.downsample.norm.weight": _t(4 * C), f"layers.{i}.downsample.norm.bias": _t(4 * C)})
    F = embed * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": _t(F), "norm.bias": _t(F), "head.weight": _t(classes, F), "head.bias": _t(classes)})
    return sd


def timm_swin(official: dict) -> dict:
    """timm's conversion of official Swin keys: computed buffers dropped, patch merging moved to the next stage."""
    out = {}
    for k, v in official.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k.replace("head.", "head.fc.")] = v
    return out


CONVNEXTS = {"convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
             "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
             "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024))}
SWINS = {"swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
         "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
         "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def _meta_model(name: str):
    with torch.device("meta"):
        return dynavit.create_model(name)


@pytest.mark.parametrize("name", list(CONVNEXTS))
def test_convnext_official_and_timm_layouts_load_strictly(name):
    model = _meta_model(name)
    official = official_convnext(*CONVNEXTS[name])
    assert set(model.state_dict()) == set(official)
    for sd in (official, timm_convnext(official)):
        assert load_state_dict(model, sd).ok


@pytest.mark.parametrize("name", list(SWINS))
def test_swin_official_and_timm_layouts_load_strictly(name):
    model = _meta_model(name)
    official = official_swin(*SWINS[name])
    assert any(k.endswith("attn_mask") for k in official) and any("relative_position_index" in k for k in official)
    for sd in (official, timm_swin(official)):
        assert load_state_dict(model, sd).ok
    # our own state dict is the official one without the computed buffers
    assert set(model.state_dict()) == {k for k in official if not k.endswith(("relative_position_index", "attn_mask"))}


def test_wrong_variant_or_classes_is_a_clear_error():
    model = _meta_model("convnext_small")
    with pytest.raises(CheckpointError, match=r"missing keys \(162\).*stages\.2\.9\."):
        load_state_dict(model, official_convnext(*CONVNEXTS["convnext_tiny"]))
    model = _meta_model("swin_tiny_patch4_window7_224")
    with pytest.raises(CheckpointError, match=r"head\.weight: \(10, 768\) vs \(1000, 768\)"):
        load_state_dict(model, timm_swin(official_swin(*SWINS["swin_tiny_patch4_window7_224"], classes=10)))


@pytest.mark.parametrize("kind", ["cnn", "swin"])
def test_timm_layout_gives_the_same_model(tref, timages, kind):
    """The authors' dense fixture weights renamed to timm's layout load and give the reference logits."""
    from safetensors.torch import load_file

    name, cfg, file, convert = (("convnext", CNN_CFG, "convnext", timm_convnext) if kind == "cnn" else
                                ("swin", SWIN_CFG, "swin", timm_swin))
    official = load_file(str(tpami(f"{file}.safetensors")))
    model = dynavit.create_model(name, **cfg).eval()
    report = load_state_dict(model, convert(official))
    assert report.ok
    with torch.no_grad():
        torch.testing.assert_close(model(timages), tref[f"{file}_logits"], atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", ["cnn", "swin"])
def test_saved_method_checkpoint_has_the_authors_keys(tmp_path, kind):
    from safetensors.torch import load_file

    name, method, cfg = ("convnext", "dynamiccnn", CNN_CFG) if kind == "cnn" else ("swin", "dynamicswin", SWIN_CFG)
    authors = set(load_file(str(tpami(f"{method}.safetensors"))))
    model = dynavit.create_model(name, method=method, checkpoint=tpami(f"{method}.safetensors"), **cfg)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert set(load_file(str(path))) == {k for k in authors if not k.endswith(("relative_position_index",
                                                                                "attn_mask"))}
    dynavit.create_model(name, method=method, checkpoint=path, **cfg)  # and it loads back strictly


@pytest.mark.parametrize("name, method, params, dense, reduced", [
    ("convnext_small", "dynamiccnn", 50.22, 8.7, 5.8), ("convnext_base", "dynamiccnn", 88.59, 15.4, 10.2),
    ("swin_small_patch4_window7_224", "dynamicswin", 49.61, 8.7, 6.9)])  # Swin-B: 15.43 -> 12.02 (docs)
def test_larger_variants_match_the_paper(name, method, params, dense, reduced):
    """Parameters (the official models') and GMACs at 224, dense and at keep rate 0.7 (TPAMI table), counted on
    the meta device (no weights, no arithmetic)."""
    with torch.device("meta"):
        d = dynavit.create_model(name)
        m = dynavit.create_model(name, method=method, keep_rate=0.7)
    assert sum(p.numel() for p in d.parameters()) / 1e6 == pytest.approx(params, abs=0.01)
    assert dynavit.count_gmacs(d) == pytest.approx(dense, abs=0.1)
    assert dynavit.count_gmacs(m) == pytest.approx(reduced, abs=0.1)
