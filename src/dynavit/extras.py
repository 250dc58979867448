"""Optional dependencies, grouped in pip extras, checked before a command does any work.

| extra | brings | enables |
|---|---|---|
| `train` | kornia, scikit-learn, scikit-image | batched DeiT augmentation (`--aug deit|light`); the `demo` dataset |
| `plot` | matplotlib | `dynavit viz`, the demo's figures |
| `export` | onnx, onnxruntime, onnxscript | `dynavit export` (dynamo exporter, onnxruntime check) |
| `hub` | huggingface_hub | `pretrained=True` for the weights hosted on the Hugging Face Hub |
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterable

from .errors import MissingExtraError

PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "huggingface_hub": "huggingface_hub",
             "kornia": "kornia", "matplotlib": "matplotlib", "onnx": "onnx", "onnxruntime": "onnxruntime",
             "onnxscript": "onnxscript"}
EXTRAS = {"train": ("kornia", "sklearn", "skimage"), "plot": ("matplotlib",),
          "export": ("onnx", "onnxruntime", "onnxscript"), "hub": ("huggingface_hub",)}


def available(module: str) -> bool:
    """True when `module` can be imported (without importing it; a `None` in sys.modules counts as absent)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, what: str, modules: Iterable[str] = ()) -> None:
    """Raise MissingExtraError naming `pip install "dynavit[extra]"` unless `modules` (default: the extra's) import.

    Args:
        extra: the pip extra that brings the modules ('train', 'plot', 'export', 'hub').
        what: what needs them, for the message (e.g. 'dynavit viz').
        modules: the import names needed (default: every module of the extra).
    """
    modules = tuple(modules) or EXTRAS[extra]
    missing = [m for m in modules if not available(m)]
    if missing:
        names = ", ".join(PIP_NAMES.get(m, m) for m in missing)
        raise MissingExtraError(f"{what} needs {names}, which is not installed: pip install \"dynavit[{extra}]\"")
