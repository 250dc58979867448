"""EViT and the pruning baselines against the EViT authors' outputs (shared/fixtures) and the formulas."""
from __future__ import annotations

import math

import pytest
import torch

import dynavit
from dynavit.methods.evit import evit_reduce
from dynavit.tokens import TokenState

from conftest import DEIT_CFG, fixture_path


def load(method="evit", **kw):
    model = dynavit.create_model("vit", method=method, **kw, **DEIT_CFG).eval()
    dynavit.load_checkpoint(model, fixture_path("deit.safetensors"))
    return model


@pytest.mark.parametrize("fuse,key", [(True, "evit_logits"), (False, "evit_nofuse_logits")])
def test_logits_match_authors(ref, ref_images, fuse, key):
    model = load(keep_rate=0.7, fuse=fuse)
    with torch.no_grad():
        logits, info = model(ref_images, return_info=True)
    torch.testing.assert_close(logits, ref[key], atol=2e-3, rtol=0)
    kept = [138, 98, 70] if fuse else [138, 97, 68]
    assert info.token_counts == [k + fuse for k in kept]


def test_selected_tokens_match_authors_as_sets(ref, ref_images):
    model = load(keep_rate=0.7)
    with torch.no_grad():
        _, info = model(ref_images, return_info=True)
    for s in range(3):
        ours, theirs = info.extra["keep_index"][s], ref[f"evit_idx_s{s}"]
        assert ours.shape == theirs.shape
        for b in range(ours.shape[0]):
            assert set(ours[b].tolist()) == set(theirs[b].tolist()), (s, b)


def test_wrong_selection_rule_is_caught(ref, ref_images):
    """Renormalising the class attention over the patches changes the fused token, so the logits move."""
    model = load(keep_rate=0.7)
    reducer = model.reducer
    original = reducer.reduce

    def renormalised(state, cls_attn, keys, keep_rate):
        a = cls_attn.clone()
        a[:, 1:] = a[:, 1:] / a[:, 1:].sum(dim=1, keepdim=True)
        return original(state, a, keys, keep_rate)

    reducer.reduce = renormalised
    with torch.no_grad():
        logits = model(ref_images)
    assert (logits - ref["evit_logits"]).abs().max() > 2e-3


def test_fusion_is_raw_weighted_sum_and_partitions_patches():
    torch.manual_seed(0)
    B, T, C = 2, 7, 4
    x = torch.randn(B, 1 + T, C)
    scores = torch.rand(B, T)
    state = TokenState.from_tokens(x.clone(), 1)
    state, keep = evit_reduce(state, scores, 3, fuse=True)
    assert state.x.shape == (B, 1 + 3 + 1, C)
    for b in range(B):
        order = sorted(range(T), key=lambda j: -scores[b, j].item())
        top, rest = order[:3], order[3:]
        assert keep[b].tolist() == top
        torch.testing.assert_close(state.x[b, 1:4], x[b, 1 + torch.tensor(top)])
        fused = sum(scores[b, j] * x[b, 1 + j] for j in rest)
        torch.testing.assert_close(state.x[b, 4], fused)
        assert state.patch_to_token[b].tolist() == [top.index(j) if j in top else 3 for j in range(T)]
    assert state.patch_sizes()[:, -1].tolist() == [T - 3.0] * B


def test_counts_follow_ceil_rule():
    model = dynavit.create_model("tiny_vit", method="evit", keep_rate=0.5).eval()
    with torch.no_grad():
        _, info = model(torch.randn(1, 3, 224, 224), return_info=True)
    expected, T = [], 196
    for _ in range(3):
        T = math.ceil(0.5 * T) + 1
        expected.append(T)
    assert info.token_counts == expected


def test_topk_equals_unfused_evit(ref, ref_images):
    with torch.no_grad():
        logits = load("topk", keep_rate=0.7)(ref_images)
    torch.testing.assert_close(logits, ref["evit_nofuse_logits"], atol=2e-3, rtol=0)


def test_random_baseline_is_seeded_and_drops_patches():
    a = dynavit.create_model("tiny_vit", method="random", keep_rate=0.5, seed=3).eval()
    b = dynavit.create_model("tiny_vit", method="random", keep_rate=0.5, seed=3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        (la, ia), (lb, ib) = a(x, return_info=True), b(x, return_info=True)
    torch.testing.assert_close(la, lb)
    assert ia.token_counts == [98, 49, 25]
    assert int((ia.patch_to_token[-1] >= 0).sum(dim=1)[0]) == 25


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.2, "x"])
def test_bad_keep_rate_raises(bad):
    with pytest.raises(dynavit.ConfigError, match="keep_rate"):
        dynavit.create_model("tiny_vit", method="evit", keep_rate=bad)


@pytest.mark.slow
def test_cli_info_reports_evit_and_bat_gmacs(capsys):
    from dynavit.cli import main

    for method, tokens in (("evit", "139 / 99 / 71"), ("bat", "138 / 97 / 68")):  # BAT: the authors' logs' budget
        assert main(["info", "deit_small_patch16_224", "--method", method, "--keep-rate", "0.7"]) == 0
        out = capsys.readouterr().out
        gmacs = float(next(line for line in out.splitlines() if line.startswith("GMACs")).split()[-1])
        assert abs(gmacs - 3.0) < 0.06, out
        assert tokens in out
