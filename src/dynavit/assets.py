"""Weights that ship inside the package: the demo's pretrained models (a few MB, safetensors).

`src/dynavit/assets/demo_models.json` lists each asset: the registered model it loads into, its keyword
arguments (and, for a fine-tuned method, the method and its arguments), what it was trained on, the exact
`dynavit train` command that reproduces it and how long that took. `load_asset("demo_vit")` builds the model
and loads the weights strictly, as does `load_asset("demo_vit_evit_0.7")` (a whole fine-tuned EViT model);
with `method=` the dense weights go into a token-reduced model (a method's own new parameters, e.g. DynamicViT's
predictors, then come from `extra=` assets or stay freshly initialised).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .checkpoint import load_checkpoint
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, unknown_name
from .registry import create_model

ASSET_DIR = Path(__file__).parent / "assets"
MANIFEST = ASSET_DIR / "demo_models.json"


@lru_cache(maxsize=1)
def manifest() -> dict:
    """{asset name: {'file', 'model', 'kwargs', 'top1', 'command', 'seconds', ...}} from demo_models.json."""
    if not MANIFEST.exists():
        raise CheckpointNotFoundError(f"the package's asset list {str(MANIFEST)!r} is missing; reinstall dynavit")
    return json.loads(MANIFEST.read_text())


def asset_path(name: str, root: Optional[Path] = None) -> Path:
    """The file of asset `name`: shipped, or `root/name/model.safetensors` when the assets were retrained into
    `root` (`dynavit demo --from-scratch`). Raises UnknownNameError / CheckpointNotFoundError."""
    assets = manifest()
    if name not in assets:
        raise unknown_name("asset", name, assets)
    path = ASSET_DIR / assets[name]["file"] if root is None else Path(root) / name / "model.safetensors"
    if not path.exists():
        raise CheckpointNotFoundError(f"asset {name!r} lists {str(path)!r}, which is missing; reinstall dynavit")
    return path


def load_asset(name: str, method: Optional[str] = None, extra: Sequence[str] = (), root: Optional[Path] = None,
               **kwargs) -> nn.Module:
    """Build asset `name`'s model (optionally with a token-reduction `method` and its kwargs) and load it.

    Dense weights load strictly into the dense model; into a method's model every dense weight must fit, and
    the method's own parameters are taken from the `extra` assets (e.g. 'demo_vit_dynamicvit_0.7').
    """
    path = asset_path(name, root)
    entry = manifest()[name]
    if entry.get("partial"):  # a method asset: its backbone first, then its own parameters
        if method not in (None, entry["method"]):
            raise ConfigError(f"asset {name!r} holds {entry['method']!r} parameters, not {method!r}")
        backbone = entry.get("backbone") or entry["needs"][-1]
        return load_asset(backbone, method=entry["method"], extra=[name, *extra], root=root,
                          **{**entry.get("method_kwargs", {}), **kwargs})
    if method is None and entry.get("method"):  # a whole fine-tuned method model
        method, kwargs = entry["method"], {**entry.get("method_kwargs", {}), **kwargs}
    model = create_model(entry["model"], method=method, **{**entry.get("kwargs", {}), **kwargs})
    report = load_checkpoint(model, path, strict=(method is None or method == entry.get("method")) and not extra)
    if report.unexpected or report.mismatched:
        raise CheckpointError(f"asset {name!r} does not fit {entry['model']} + {method}: unexpected "
                              f"{report.unexpected[:5]}, mismatched {report.mismatched[:5]}")
    missing = set(report.missing)
    for other in extra:
        missing &= set(load_checkpoint(model, asset_path(other, root), strict=False).missing)
    model.asset_missing = sorted(missing)  # parameters no asset provided (freshly initialised)
    return model


def retrain_commands(name: str, root: Path) -> list:
    """The `dynavit train` argument lists that made asset `name` (and the assets it starts from), with their
    outputs under `root`, in the order to run them."""
    assets = manifest()
    if name not in assets:
        raise unknown_name("asset", name, assets)
    cmds = []
    for dep in assets[name].get("needs", []):
        cmds += [c for c in retrain_commands(dep, root) if c not in cmds]
    cmds.append([a.replace("{root}", str(root)) for a in assets[name]["command"]])
    return cmds
