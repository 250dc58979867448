"""A method written in one file of another installed package works in every command, with no edit to dynavit.

The package is built in a temporary folder: a module that registers `norm_topk` (keep the tokens of largest
norm after blocks 3, 6 and 9) and the `.dist-info` that `pip install` would write, with its `dynavit.methods`
entry point. It brings no recipe, so it trains with the generic fine-tune recipe.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings

import pytest

from dynavit import registry
from dynavit.cli import main
from test_data import make_image_folder

PLUGIN = '''
"""norm_topk: keep the ceil(rho * T) tokens of largest L2 norm after blocks 3, 6 and 9."""
import math

import dynavit


class NormTopK(dynavit.TokenReducer):
    name = "norm_topk"

    def __init__(self, keep_rate=0.7, locations=(3, 6, 9)):
        self.locations = tuple(locations)
        self.set_keep_rate(keep_rate)

    def set_keep_rate(self, keep_rate):
        if not 0 < float(keep_rate) <= 1:
            raise dynavit.ConfigError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        self.keep_rate = float(keep_rate)

    def after_attention(self, model, i, state, cls_attn, keys):
        if i not in self.locations:
            return state
        k = max(1, math.ceil(self.keep_rate * state.num_tokens))
        norms = state.x[:, state.num_prefix:].norm(dim=-1)  # (B, T)
        keep = norms.topk(k, dim=1).indices
        state = dynavit.select_tokens(state, keep)
        if state.info is not None:
            state.info.extra.setdefault("norm_kept", []).append(keep)
        state.record_stage()
        return state


@dynavit.register_method("norm_topk", params=("keep_rate", "locations"), identity={"keep_rate": 1.0},
                         info_fields={"norm_kept": "per stage, (B, k) indices of the largest-norm tokens"})
def apply_norm_topk(model, keep_rate=0.7, locations=(3, 6, 9)):
    """Keep the tokens of largest norm after blocks 3, 6 and 9."""
    model.reducer = NormTopK(keep_rate, locations)
    return model
'''
ENTRY_POINTS = "[dynavit.methods]\nnorm_topk = normtopk_plugin.method\n"
TINY = ["--set", "embed_dim=32", "--set", "depth=10", "--set", "num_heads=2", "--set", "patch_size=8",
        "--img-size", "32"]
METHOD = ["--method", "norm_topk", "--keep-rate", "0.5"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder on which `normtopk_plugin` is installed (its module and its .dist-info)."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / "normtopk_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(PLUGIN)
    dist = root / "normtopk_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: normtopk-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin(site, monkeypatch):
    """The plugin registered through its entry point in this process; unregistered afterwards."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    registry.list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    assert "norm_topk" not in registry._METHODS
    assert "normtopk_plugin.method" in registry.load_plugins()
    assert "norm_topk" in registry.list_methods()
    yield
    sys.modules.pop("normtopk_plugin.method", None)
    sys.modules.pop("normtopk_plugin", None)


def test_a_fresh_process_finds_the_plugin(site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "dynavit", "models"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(ln for ln in res.stdout.splitlines() if "norm_topk" in ln)
    assert "keep_rate, locations" in line and "recipe: finetune" in line


def test_every_command_works_with_the_plugin(plugin, tmp_path, capsys):
    assert main(["info", "vit", *TINY, *METHOD]) == 0
    out = capsys.readouterr().out
    assert "16 patches -> per stage 8 / 4 / 2" in out and "norm_kept: per stage" in out

    assert main(["flops", "--model", "vit", *TINY, *METHOD, "--json", str(tmp_path / "f.json")]) == 0
    flops = json.loads((tmp_path / "f.json").read_text())
    assert [s["tokens"] for s in flops["stages"]] == [16, 8, 4] and flops["method"] == "norm_topk"  # into blocks

    assert main(["bench", "--model", "vit", *TINY[:8], "--img-size", "32", "--method", "norm_topk:0.5",
                 "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--b1-repeats", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    dense, norm = json.loads((tmp_path / "b.json").read_text())["results"]
    assert norm["method"] == "norm_topk:0.5" and norm["gmacs"] < dense["gmacs"]

    data = make_image_folder(tmp_path / "imgs", n_train=4, n_val=2, size=(32, 32))
    run = tmp_path / "run"
    assert main(["train", "--model", "vit", *TINY, *METHOD, "--data", str(data), "--output", str(run),
                 "--device", "cpu", "--workers", "0", "--max-steps", "2", "--batch-size", "4", "--aug", "none",
                 "--log-every", "1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "finetune" and summary["method"] == "norm_topk"  # no recipe of its own
    assert summary["keep_rate"] == 0.5  # the schedule target, read from --keep-rate

    assert main(["eval", "--model", "vit", *TINY, *METHOD, "--checkpoint", str(run), "--data", str(data),
                 "--device", "cpu", "--workers", "0", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 6

    png = tmp_path / "viz.png"
    assert main(["viz", "--model", "vit", *TINY, *METHOD, "--num-classes", "3", "--checkpoint", str(run), "--image",
                 str(data / "val" / "a" / "0.png"), "--output", str(png)]) == 0
    assert png.stat().st_size > 1000

    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", "--model", "vit", *TINY, *METHOD, "--num-classes", "3", "--checkpoint", str(run),
                     "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "max |d logit|" in capsys.readouterr().out


def test_a_broken_plugin_warns_and_the_rest_works(tmp_path, monkeypatch):
    broken = tmp_path / "broken-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[dynavit.methods]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.warns(UserWarning, match="no_such_module_here"):
        loaded = registry.load_plugins()
    assert "no_such_module_here" not in loaded and "evit" in registry.list_methods()
