"""What `--checkpoint` / `--init` accept in every command, and the one rule for loading them.

A weights argument is a file (.safetensors / .pth), a run directory (its `model.safetensors`, or the last
checkpoint of an interrupted run) or the name of a shipped asset (`demo_vit`; a method asset such as
`demo_vit_<method>_0.7` names its backbone, which is loaded first). The model to build comes from the asset
or the run's `summary.json` when `--model` is omitted; a different `--model` is refused.

Loading rule: every backbone weight must be loaded. The tensors a method adds to a dense model (e.g. learned
predictors) may be missing: `--init` of a dense checkpoint into a method's model is the papers' fine-tune; in
`eval` / `viz` / `export` it is said in a warning (the method's choices are then arbitrary). A classifier of
another size is re-initialised by `--init` (a fine-tune to new classes, as DeiT's main.py) and an error
elsewhere (it says `--num-classes N`). Anything else left unloaded is a CheckpointError listing it, unless
`--allow-partial` asks for loading what fits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..registry import create_model

PARTIAL_FLAG = "--allow-partial"
HEAD_PREFIXES = ("head.", "head_dist.", "aux_head.")


@dataclass
class Weights:
    """A resolved weights argument: files to load in order, and what is known of the model they are for."""

    spec: str
    files: list
    model: Optional[str] = None  # the registered model they were made for (asset / run), if known
    kwargs: dict = field(default_factory=dict)  # its architecture arguments
    method: Optional[str] = None
    method_kwargs: dict = field(default_factory=dict)
    classes: Optional[list] = None  # class names, if the run saved them
    asset: Optional[str] = None

    @property
    def label(self) -> str:
        return self.asset or self.spec


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _classes_from_file(path: Path) -> Optional[list]:
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["classes"]) if "classes" in meta else None
    except Exception:  # noqa: BLE001 - metadata is optional; read_checkpoint reports real problems
        return None


def resolve_weights(spec: str) -> Weights:
    """A file, a run directory or a shipped asset name -> Weights. Raises CheckpointNotFoundError."""
    from ..assets import asset_path, manifest

    p = Path(spec)
    if p.is_dir():
        from ..train.state import latest_checkpoint

        summary = _read_json(p / "summary.json")
        target = p / "model.safetensors"
        if not target.exists():
            last = latest_checkpoint(p)
            if last is None:
                raise CheckpointNotFoundError(f"folder {spec!r} holds no model.safetensors and no checkpoints/: "
                                              f"not a dynavit run directory (give the weights file instead)")
            target = last / "model.safetensors"
            print(f"note: {spec!r} has no final model.safetensors (an unfinished run?): loading {target}")
        w = Weights(spec, [target], summary.get("model"), dict(summary.get("model_kwargs") or {}),
                    summary.get("method") if summary.get("method") != "dense" else None,
                    dict(summary.get("method_kwargs") or {}), summary.get("classes"))
        w.classes = w.classes or _classes_from_file(target)
        return w
    if p.exists():
        run = _read_json(p.parent / "summary.json") if p.name == "model.safetensors" else {}
        return Weights(spec, [p], classes=run.get("classes") or _classes_from_file(p))
    assets = manifest()
    if spec in assets:
        entry = assets[spec]
        files = [asset_path(spec)]
        if entry.get("partial"):
            backbone = entry.get("backbone") or entry["needs"][-1]
            files.insert(0, asset_path(backbone))
        return Weights(spec, files, entry["model"], dict(entry.get("kwargs", {})), entry.get("method"),
                       dict(entry.get("method_kwargs", {})), entry.get("classes"), asset=spec)
    import difflib

    close = difflib.get_close_matches(spec, sorted(assets), n=2, cutoff=0.6)
    raise CheckpointNotFoundError(
        f"checkpoint {spec!r} not found: it is not a file, a run directory or a shipped asset"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else f" (assets: {', '.join(sorted(assets))})"))


def model_for(args, w: Optional[Weights]) -> tuple:
    """(model name, method, create_model kwargs) from the command line, completed by the weights' own."""
    from ._common import model_kwargs

    kw = model_kwargs(args)
    name, method = args.model, args.method
    if w is not None and w.model is not None and name is not None and name != w.model \
            and getattr(args, "allow_partial", False):
        print(f"note: {w.label!r} was made for model {w.model!r}; {PARTIAL_FLAG}: loading what fits into {name!r}")
    elif w is not None and w.model is not None:
        if name is not None and name != w.model:
            raise ConfigError(f"{w.label!r} holds weights for model {w.model!r}, not {name!r}: drop --model or pass "
                              f"--model {w.model}")
        name = w.model
        if method is None and w.method:
            method = w.method
            print(f"note: {w.label!r} is for method {w.method!r} {w.method_kwargs or ''}".rstrip())
        elif method not in (None, "dense") and w.method and method != w.method:
            raise ConfigError(f"{w.label!r} holds {w.method!r} weights, not {method!r}: drop --method or pass "
                              f"--method {w.method}")
        extra = dict(w.kwargs)
        if method == w.method:
            extra.update(w.method_kwargs)
        kw = {**extra, **kw}
    if name is None:
        raise ConfigError("--model is required (or a --checkpoint that names a shipped asset or a dynavit run "
                          "directory)")
    return name, method, kw


def checkpoint_classes(w: Weights) -> Optional[int]:
    """The class count of the weights (their classifier's rows), read without building a model."""
    from ..checkpoint import num_classes_of, read_checkpoint, unwrap_state_dict

    n = None
    for f in w.files:
        sd = unwrap_state_dict(read_checkpoint(f))
        for prefix in ("module.", "_orig_mod."):
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
        n = num_classes_of(sd) or n
    return n


def model_and_weights(args) -> tuple:
    """(model, Weights or None, model name, method) of `--checkpoint` and the command line: the model built with
    the checkpoint's class count unless `--num-classes` gives one, the weights resolved but not loaded yet."""
    w = resolve_weights(args.checkpoint) if args.checkpoint else None
    name, method, kw = model_for(args, w)
    if w is not None and "num_classes" not in kw:
        n = checkpoint_classes(w)
        if n is not None:
            kw["num_classes"] = n
    return create_model(name, method=method, **kw), w, name, method


def _method_assets(backbone: Optional[str], method: Optional[str]) -> list:
    """Shipped assets that hold `method`'s parameters (alone, or a whole fine-tuned model) for asset `backbone`."""
    if backbone is None:
        return []
    from ..assets import manifest

    return [n for n, e in manifest().items() if e.get("method") and e.get("method") == method
            and (e.get("backbone") or (e.get("needs") or [None])[-1]) == backbone]


def _short(keys: list, limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, w: Weights, purpose: str = "checkpoint", partial: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Load `w` into `model` by the rule in this module's docstring; returns the key lists it reported.

    purpose: 'init' (train --init: a new classifier size is re-initialised) or 'checkpoint' (eval, viz, export).
    """
    import torch

    from ..checkpoint import filter_state_dict, num_classes_of, read_checkpoint, LoadReport

    report = LoadReport()
    sd = {}
    for f in w.files:
        sd.update(filter_state_dict(read_checkpoint(f), model, report))
    target = model.state_dict()
    method_keys = set(getattr(model, "method_state_keys", ()))
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
                  if k in target and sd[k].shape != target[k].shape]
    heads = [m for m in mismatched if m[0].startswith(HEAD_PREFIXES)]
    new_head = purpose == "init" and bool(heads) and len(heads) == len(mismatched)
    unloaded = [k for k in missing if k not in method_keys]
    unloaded += [k for k, _, _ in mismatched if not (new_head and k.startswith(HEAD_PREFIXES))]
    name = getattr(model, "model_name", type(model).__name__)
    flag = "--init" if purpose == "init" else "--checkpoint"
    if unloaded and not partial:
        n_ckpt, n_model = num_classes_of(sd), num_classes_of(target)
        hint = ""
        if n_ckpt is not None and n_model is not None and n_ckpt != n_model and purpose != "init":
            hint = f"; it has {n_ckpt} classes, the model {n_model}: pass --num-classes {n_ckpt}"
        detail = f"mismatched shapes {_short([f'{k} {a} vs {b}' for k, a, b in mismatched], 3)}; " if mismatched else ""
        raise CheckpointError(
            f"{flag} {w.label!r} does not fit model {name!r}: {len(unloaded)} of its {len(target)} tensors would stay "
            f"at their initial values ({detail}not loaded: {_short(unloaded)}){hint}. Is it for another model or "
            f"size? Pass {PARTIAL_FLAG} to load only what fits")
    fitting = {k: v for k, v in sd.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    with torch.no_grad():
        for k, v in fitting.items():
            target[k].copy_(v.to(target[k].dtype))
    what = "init" if purpose == "init" else "loaded"
    log(f"{what}: {w.label} ({len(fitting)} of {len(target)} tensors" +
        (f"; {'; '.join(report.converted)}" if report.converted else "") + ")")
    method_missing = [k for k in missing if k in method_keys]
    if method_missing:
        if purpose == "init":
            log(f"  newly initialised method parameters ({len(method_missing)}): {_short(method_missing, 4)}")
        else:
            shipped = _method_assets(w.asset, getattr(getattr(model, "reducer", None), "name", None))
            log(f"warning: the method's {len(method_missing)} parameters ({_short(method_missing, 2)}) are not in "
                f"{w.label!r}: freshly initialised, so its choices are arbitrary (use weights trained with the "
                f"method" + (f", e.g. --checkpoint {shipped[0]}" if shipped else "") + ")")
    if new_head:
        log(f"  new classifier ({', '.join(f'{k} {a} -> {b}' for k, a, b in heads[:2])}): re-initialised")
    if partial and unloaded:
        log(f"  {PARTIAL_FLAG}: {len(unloaded)} tensors left at their initial values: {_short(unloaded)}")
    if unexpected:
        log(f"  ignored ({len(unexpected)} not in the model): {_short(unexpected, 4)}")
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "unloaded": unloaded}


def add_weights_args(p, flag: str = "--checkpoint", help_text: Optional[str] = None) -> None:
    p.add_argument(flag, default=None, help=help_text or "weights: a .safetensors / .pth file, a run directory, or a "
                   "shipped asset name (e.g. demo_vit); omit for the freshly initialised model")
    p.add_argument(PARTIAL_FLAG, action="store_true", help="load what fits from the weights and leave the rest at "
                   "its initial values (otherwise unloaded backbone weights are an error)")
