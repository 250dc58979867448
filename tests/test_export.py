"""ONNX export of the dense model and of every fixed-count method, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import sys

import pytest
import torch

import dynavit
from dynavit.export import export_onnx

pytest.importorskip("onnxruntime")
from conftest import FIXED_COUNT_METHODS, TINY64_CFG as CFG

# bat_pairs: several pairs and clusters per stage (4/2/1 pairs, 4/2/1 clusters), so the matching runs 4 rounds
CASES = {**FIXED_COUNT_METHODS, "bat_pairs": dict(method="bat", keep_rate=0.5, pair_ratio=0.5)}


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = dynavit.create_model("vit", **CASES[name], **CFG).eval()
    res = export_onnx(model, tmp_path / f"{name}.onnx", batch_size=2, dynamo=True)
    assert res["exporter"] == "dynamo" and res["max_abs_diff"] is not None and res["max_abs_diff"] <= 1e-4


def test_bat_export_only_ops_match_pytorch(tmp_path):
    """The two places where BAT's ONNX graph records another op than PyTorch runs: the stable descending sort
    (ONNX TopK, whose ties go to the lower index) and cdist (its matrix-product form). Exact order on ties."""
    import onnxruntime as ort

    from dynavit.methods import _cluster
    from dynavit.ops import argsort_desc

    class Ops(torch.nn.Module):
        def forward(self, scores, z):
            return argsort_desc(scores), _cluster.pairwise_distance(z)

    scores = torch.randint(0, 4, (3, 40)).float() / 8  # many exact ties
    z = torch.randn(3, 30, 16)
    path = tmp_path / "ops.onnx"
    torch.onnx.export(Ops().eval(), (scores, z), str(path), dynamo=True)
    assert not torch.onnx.is_in_onnx_export()
    order, dist = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"scores": scores.numpy(), "z": z.numpy()})
    ref_order, ref_dist = Ops()(scores, z)
    assert torch.equal(torch.from_numpy(order), ref_order)
    torch.testing.assert_close(torch.from_numpy(dist), ref_dist, atol=1e-5, rtol=0)


def test_cli_export(tmp_path, capsys):
    from dynavit.cli import main

    out = tmp_path / "m.onnx"
    rc = main(["export", "--model", "tiny_vit", "--method", "evit", "--img-size", "64", "--set", "depth=4",
               "--set", "locations=[1,2]", "--onnx", str(out)])
    assert rc in (0, None) and out.exists()
    text = capsys.readouterr().out
    assert "max |d logit|" in text and "dynamic batch" in text and "at batch 1, 3" in text


def test_cli_export_failure_is_one_line(tmp_path, capsys):
    from dynavit.cli import main

    rc = main(["export", "--model", "tiny_vit", "--method", "evit", "--img-size", "64", "--legacy",
               "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    # the TorchScript exporter either refuses index_add with repeated indices or (dynamic batch) records a
    # scatter that drops the repeats, which the onnxruntime check catches: one line either way
    assert rc != 0 and ("ONNX export" in err or "differ from PyTorch" in err) and "Traceback" not in err
    assert err.count("\n") == 0


def _spread_predictors(model):
    """Random predictors score every token almost alike, so top-k would pick among near ties that onnxruntime and
    PyTorch may break differently (1e-7 apart); wider weights make the ranking clear."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.score_predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_dynamic_batch_is_default_and_file_is_self_contained(tmp_path):
    """One .onnx with a symbolic batch axis, checked at batch 1 and 3; token counts per stage stay fixed; the file
    alone (copied elsewhere) runs, and no .onnx.data appears."""
    import shutil

    import onnx
    import onnxruntime as ort

    cfg = {**CFG, "depth": 6}  # prunes before blocks 1, 3, 4 (16 -> 11 -> 7 -> 5 tokens)
    model = _spread_predictors(dynavit.create_model("vit", method="dynamicvit", keep_rate=0.7, **cfg)).eval()
    res = export_onnx(model, tmp_path / "dyn.onnx")
    assert res["dynamic_batch"] and res["checked_batches"] == [1, 3] and res["max_abs_diff"] <= 1e-4
    assert res["external_data"] is None and sorted(p.name for p in tmp_path.iterdir()) == ["dyn.onnx"]
    graph = onnx.load(str(tmp_path / "dyn.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(tmp_path / "dyn.onnx", moved / "m.onnx")
    session = ort.InferenceSession(str(moved / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    (out,) = session.run(None, {"image": x.numpy()})
    assert (torch.from_numpy(out) - ref).abs().max() <= 1e-4


def test_weights_above_the_limit_go_to_external_data_and_are_reported(tmp_path, monkeypatch, capsys):
    from dynavit import export as E
    from dynavit.cli import main

    monkeypatch.setattr(E, "EMBED_LIMIT", 0)  # stand-in for a > 2 GiB model
    out = tmp_path / "big.onnx"
    rc = main(["export", "--model", "tiny_vit", "--img-size", "64", "--set", "depth=2", "--batch-size", "2",
               "--onnx", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "big.onnx.data").exists()
    assert "batch 2" in text and "big.onnx.data" in text and "2 GiB" in text


@pytest.mark.parametrize("args", [["--model", "tiny_vit", "--method", "dynamicvit", "--set", "keep_mode=threshold"],
                                  ["--model", "dit_tiny", "--img-size", "64"]])
def test_non_exportable_modes_fail_before_the_exporter(args, tmp_path, monkeypatch, capsys):
    from dynavit.cli import main

    def never(*a, **k):
        raise AssertionError("the exporter must not start")

    monkeypatch.setattr(torch.onnx, "export", never)
    rc = main(["export", *args, "--onnx", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    err = captured.err.strip()
    assert err.count("\n") == 0 and "cannot export" in err and "data-dependent shapes" in err
    with pytest.raises(dynavit.export.ExportError, match="cannot export"):
        model = dynavit.create_model(args[1], **({"method": "dynamicvit", "keep_mode": "threshold"}
                                                 if args[1] == "tiny_vit" else {}))
        export_onnx(model, tmp_path / "m.onnx")


def test_cli_export_names_the_missing_extra(monkeypatch, tmp_path, capsys):
    from dynavit.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    rc = main(["export", "--model", "tiny_vit", "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "dynavit[export]"' in err and "onnxscript" in err
