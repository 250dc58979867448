"""GMACs of the executed path: DeiT-S dense gives 4.6, counts match the analytic block formula, CLI JSON."""
from __future__ import annotations

import json

import pytest
import torch

import dynavit
from dynavit.cli import main
from dynavit.flops import count_gmacs, flops_breakdown, vit_block_macs

from conftest import vit_methods


def _meta_model(name, **kw):
    """Counting needs shapes only: build on the meta device (no weights, no compute)."""
    with torch.device("meta"):
        model = dynavit.create_model(name, **kw)
    return model, torch.randn(1, 3, model.img_size, model.img_size, device="meta")


def test_deit_small_dense_is_4_6_gmacs():
    model, x = _meta_model("deit_small_patch16_224")
    gmacs = flops_breakdown(model, x)["gmacs"]
    assert round(gmacs, 1) == 4.6
    # analytic: patch embedding + 12 blocks on 197 tokens + head
    analytic = 196 * 384 * 3 * 16 * 16 + 12 * vit_block_macs(197, 384) + 384 * 1000
    assert gmacs * 1e9 == pytest.approx(analytic, rel=1e-9)


def test_breakdown_matches_analytic_blocks_and_total():
    model = dynavit.create_model("tiny_vit")  # width 48, 12 blocks, 10 classes
    report = flops_breakdown(model)
    assert report["gmacs"] == pytest.approx(count_gmacs(model), rel=1e-12)
    assert [b["tokens"] for b in report["blocks"]] == [196] * 12
    for b in report["blocks"]:
        assert b["gmacs"] * 1e9 == pytest.approx(vit_block_macs(197, 48), rel=1e-9)
    assert report["stages"] == [{"blocks": [0, 11], "tokens": 196, "gmacs": pytest.approx(12 * vit_block_macs(197, 48) / 1e9)}]
    assert sum(p["gmacs"] for p in report["parts"]) == pytest.approx(report["gmacs"], rel=1e-9)
    names = [p["name"] for p in report["parts"]]
    assert names[0] == "patch_embed" and names[-1] == "head" and "(outside modules)" not in names


@pytest.mark.parametrize("method", [n for n, s in vit_methods().items() if s.primary == "keep_rate"])
def test_reduced_path_counts_only_kept_tokens(method):
    dense, x = _meta_model("deit_small_patch16_224")
    model, _ = _meta_model("deit_small_patch16_224", method=method, keep_rate=0.7)
    d, r = flops_breakdown(dense, x), flops_breakdown(model, x)
    assert 2.8 < r["gmacs"] < 3.3 < d["gmacs"]  # the papers: 2.9 (DynamicViT), 3.0 (EViT, BAT) at 0.7
    tokens = [s["tokens"] for s in r["stages"]]
    assert tokens[0] == 196 and tokens == sorted(tokens, reverse=True) and len(tokens) == 4
    assert sum(p["gmacs"] for p in r["parts"]) == pytest.approx(r["gmacs"], rel=1e-9)
    if method == "dynamicvit":  # pruning happens before blocks: every block is the analytic block on its tokens
        for b in r["blocks"]:
            assert b["gmacs"] * 1e9 == pytest.approx(vit_block_macs(b["tokens"] + 1, 384), rel=1e-9)
        assert [p["name"] for p in r["parts"] if p["name"].startswith("score_predictor")] == \
            ["score_predictor.0", "score_predictor.1", "score_predictor.2"]


def test_flops_cli_json(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["flops", "--model", "tiny_vit", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny_vit" and report["method"] == "dense"
    assert set(report) >= {"gmacs", "parts", "blocks", "stages"}
    assert f"{report['gmacs']:.3f} GMACs" in capsys.readouterr().out


def test_flops_cli_bad_keep_rate_is_one_line_error(capsys):
    assert main(["flops", "--model", "tiny_vit", "--method", "evit", "--keep-rate", "1.5"]) == 2
    assert "1.5" in capsys.readouterr().err
