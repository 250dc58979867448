"""Tensor operations shared by several methods that must also export to ONNX unchanged.

`argsort_desc` is the stable descending sort every plan uses (BAT's split, ToMe's matching); ONNX has no
stable sort, so during an ONNX export (`onnx_exporting`) an equivalent op is recorded instead. `may_sync` says
where a plan may take a data-dependent shortcut (BAT's early exit and subgraph, ToMe's top-k plan).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor


def onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing this call (without importing torch.onnx just to ask)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def argsort_desc(scores: Tensor) -> Tensor:
    """Stable descending argsort of (B, T) scores (ties: the earlier token first).

    ONNX has no stable sort, but its TopK (what the exporter makes of a plain sort) breaks ties by the lower
    index, which is exactly this order; so the ONNX export records the plain sort and PyTorch runs the stable one.
    """
    if onnx_exporting():
        return scores.sort(dim=1, descending=True).indices
    return scores.argsort(dim=1, descending=True, stable=True)


def may_sync(t: Tensor) -> bool:
    """Whether a data-dependent Python branch on `t` is free here: eager CPU (reading a CPU tensor is no device
    sync), not while compiling, tracing or exporting (where control flow must not depend on values)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not onnx_exporting())
