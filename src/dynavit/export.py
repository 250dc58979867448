"""Deployment: ONNX export verified against PyTorch with onnxruntime.

Fixed token counts per stage (top-k, fixed r) keep every shape static, so a reduced model exports as one graph.
The ONNX file is checked by running it in onnxruntime on the same input and comparing logits.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError, DynavitError


class ExportError(DynavitError, RuntimeError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


def export_onnx(model: nn.Module, path, batch_size: int = 1, img_size: Optional[int] = None,
                dynamo: bool = True, opset: Optional[int] = None, verify: bool = True, atol: float = 1e-4,
                seed: int = 0) -> dict:
    """Export `model` (eval mode) to ONNX at `path`; with verify, run it in onnxruntime and compare logits.

    Returns {"path", "max_abs_diff", "exporter", "opset"}. Raises ExportError when the difference exceeds atol.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    model = model.eval()
    size = img_size or getattr(model, "img_size", 224)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), size, size, generator=gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or (18 if dynamo else 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=opset,
                              input_names=["image"], output_names=["logits"])
        except Exception as e:  # the exporters raise many types; report one clear error
            raise ExportError(f"ONNX export of {getattr(model, 'model_name', type(model).__name__)} failed "
                              f"({'dynamo' if dynamo else 'torchscript'} exporter, opset {opset}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    result = {"path": str(path), "exporter": "dynamo" if dynamo else "torchscript", "opset": opset,
              "max_abs_diff": None}
    if verify:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref = model(x)
        diff = float((torch.from_numpy(onnx_logits) - ref).abs().max())
        result["max_abs_diff"] = diff
        if not diff <= atol:
            raise ExportError(f"exported ONNX logits differ from PyTorch by {diff:.2e} (allowed {atol:.0e})")
    return result
