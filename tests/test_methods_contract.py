"""Contract of every merging / class-attention method: shapes, dtypes, batch sizes, resolutions, identity at
keep rate 1, token counts, and the patch map (a partition for merging methods, -1 only for pruning)."""
from __future__ import annotations

import pytest
import torch

import dynavit

from conftest import DEIT_CFG

# name -> (method, kwargs at a real reduction, kwargs that reduce nothing, merges (no patch is lost))
METHODS = {
    "evit": ("evit", dict(keep_rate=0.7), dict(keep_rate=1.0), True),
    "evit_nofuse": ("evit", dict(keep_rate=0.7, fuse=False), dict(keep_rate=1.0, fuse=False), False),
    "topk": ("topk", dict(keep_rate=0.7), dict(keep_rate=1.0), False),
    "random": ("random", dict(keep_rate=0.7, seed=0), dict(keep_rate=1.0), False),
    "tome": ("tome", dict(r=8), dict(r=0), True),
    "bat": ("bat", dict(keep_rate=0.7), dict(keep_rate=1.0), True),
    "bat_chain_gauss": ("bat", dict(keep_rate=0.5, assign="chain", density="gaussian"), dict(keep_rate=1.0), True),
    "bat_kmeans": ("bat", dict(keep_rate=0.7, merger="kmeans", variant="cluster"), dict(keep_rate=1.0), True),
    "bat_pool": ("bat", dict(keep_rate=0.7, merger="pool"), dict(keep_rate=1.0), True),
    "bat_pack": ("bat", dict(keep_rate=0.7, variant="pack"), dict(keep_rate=1.0), True),
    "bat_attentive": ("bat", dict(keep_rate=0.7, variant="attentive"), dict(keep_rate=1.0), False),
    "bat_keys": ("bat", dict(keep_rate=0.7, feature="keys", merge_weight="mean"), dict(keep_rate=1.0), True),
}
SMALL = dict(DEIT_CFG, depth=4, embed_dim=24)  # 4 blocks: locations default to [1, 2, 3]


def build(name: str, reduce: bool = True, **cfg):
    method, on, off, _ = METHODS[name]
    torch.manual_seed(0)
    return dynavit.create_model("vit", method=method, **(on if reduce else off), **{**SMALL, **cfg}).eval()


def check_patch_map(info, num_patches: int, merging: bool) -> None:
    for count, p2t, sizes in zip(info.token_counts, info.patch_to_token, info.sizes):
        assert p2t.shape[1] == num_patches and int(p2t.max()) < count
        kept = p2t >= 0
        if merging:
            assert bool(kept.all()), "a merging method lost a patch"
        # every surviving token holds at least one patch and sizes count them
        for b in range(p2t.shape[0]):
            held = torch.bincount(p2t[b][kept[b]], minlength=count)
            if merging:
                assert bool((held >= 1).all())
                torch.testing.assert_close(sizes[b].float(), held.float())


CORE = ["evit", "evit_nofuse", "topk", "random", "tome", "bat"]
GRID = [(1, 224, torch.float32), (33, 224, torch.bfloat16), (1, 384, torch.bfloat16), (33, 384, torch.float32)]
CASES = [(n, *g) for n in CORE for g in GRID] + [(n, *g) for n in METHODS if n not in CORE for g in GRID[1:3]]


@pytest.mark.parametrize("name,batch,img,dtype", CASES)
def test_runs_batch_resolution_dtype(name, batch, img, dtype):
    model = build(name, img_size=img).to(dtype)
    x = torch.randn(batch, 3, img, img, dtype=dtype)
    with torch.no_grad():
        out, info = model(x, return_info=True)
    assert out.shape == (batch, 10) and out.dtype == dtype and bool(torch.isfinite(out).all())
    assert info.token_counts and all(a > b for a, b in zip([model.num_patches] + info.token_counts,
                                                            info.token_counts))
    check_patch_map(info, model.num_patches, METHODS[name][3])


@pytest.mark.parametrize("name", list(METHODS))
def test_no_reduction_equals_dense(name):
    torch.manual_seed(0)
    dense = dynavit.create_model("vit", **SMALL).eval()
    model = build(name, reduce=False)
    model.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, info = model(x, return_info=True)
        ref = dense(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert all(c == model.num_patches for c in info.token_counts)


@pytest.mark.parametrize("name", ["evit", "tome", "bat", "bat_kmeans"])
def test_backward_reaches_every_parameter(name):
    model = build(name).train()
    out = model(torch.randn(2, 3, 224, 224))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", ["evit", "bat", "topk", "random"])
def test_keep_rate_changes_at_run_time(name):
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    counts = []
    for rate in (1.0, 0.9, 0.5):
        model.reducer.set_keep_rate(rate)
        with torch.no_grad():
            counts.append(model(x, return_info=True)[1].token_counts)
    assert counts[0] == [196] * 3 and counts[1][0] > counts[2][0]
    with pytest.raises(dynavit.ConfigError, match="keep_rate"):
        model.reducer.set_keep_rate(1.5)


def test_distilled_prefix_tokens_untouched():
    for name in ("evit", "tome", "bat"):
        model = build(name, distilled=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            out, info = model(x, return_info=True)
        assert out.shape == (2, 10)
        check_patch_map(info, model.num_patches, True)


def test_locations_and_lvvit_defaults():
    lv = dynavit.create_model("lvvit", method="bat", keep_rate=0.7, embed_dim=48, num_heads=3, num_classes=10)
    assert lv.reducer.locations == (4, 8, 12)  # LV-ViT-S's published GMACs (tests/test_bat_fidelity.py)
    assert dynavit.create_model("tiny_vit", method="evit").reducer.locations == (3, 6, 9)
    with torch.no_grad():
        _, info = lv.eval()(torch.randn(1, 3, 224, 224), return_info=True)
    assert info.token_counts == [138, 97, 68]  # budget="logs" at 0.7: K tokens per stage
    with pytest.raises(dynavit.ConfigError, match="locations"):
        dynavit.create_model("tiny_vit", method="bat", locations=[6, 3])
