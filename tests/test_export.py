"""ONNX export of the dense model and of every fixed-count method, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import pytest
import torch

import dynavit
from dynavit.export import export_onnx

pytest.importorskip("onnxruntime")
from conftest import FIXED_COUNT_METHODS, TINY64_CFG as CFG

# bat_pairs: several pairs and clusters per stage (4/2/1 pairs, 5/3/2 clusters), so the matching runs 4 rounds
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
    rc = main(["export", "--model", "tiny_vit", "--method", "evit", "--img-size", "64", "--onnx", str(out)])
    assert rc in (0, None) and out.exists()
    assert "max |d logit|" in capsys.readouterr().out


def test_cli_export_failure_is_one_line(tmp_path, capsys):
    from dynavit.cli import main

    rc = main(["export", "--model", "tiny_vit", "--method", "evit", "--img-size", "64", "--legacy",
               "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc != 0 and "ONNX export" in err and "Traceback" not in err
