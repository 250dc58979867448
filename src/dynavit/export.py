"""Deployment: ONNX export verified against PyTorch with onnxruntime.

Fixed token counts per stage (top-k, fixed r) keep every shape but the batch static, so a reduced model exports as
one graph with a dynamic batch axis. The ONNX file is checked by running it in onnxruntime on the same inputs
(batch 1 and 3 for a dynamic batch) and comparing logits.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError, DynavitError


class ExportError(DynavitError, RuntimeError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


ONNX_LIMIT = 2 * 1024 ** 3  # protobuf's limit: a model file with its weights inside must stay below 2 GiB
EMBED_LIMIT = int(1.8 * 1024 ** 3)  # weights above this go to external data (room for the graph itself)


def export_blocker(model: nn.Module) -> Optional[str]:
    """Why `model` cannot be exported as one static graph, or None: asked of its reducer and of the model itself
    (a model family with data-dependent routing), before the exporter starts."""
    for part in (getattr(model, "reducer", None), model):
        ask = getattr(part, "export_blocker", None)
        reason = ask() if callable(ask) else None
        if reason:
            return reason
    return None


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(model: nn.Module, path, batch_size: Optional[int] = None, img_size: Optional[int] = None,
                dynamo: bool = True, opset: Optional[int] = None, verify: bool = True, atol: float = 1e-4,
                seed: int = 0, check_batches: tuple = (1, 3)) -> dict:
    """Export `model` (eval mode) to ONNX at `path`; with verify, run it in onnxruntime and compare logits.

    Args:
        batch_size: None (default) exports a dynamic batch axis (token counts per stage stay static) and checks
            it at every batch in `check_batches`; an int exports that static batch and checks it.
        img_size: input resolution (default: the model's). dynamo: the dynamo exporter (default) or TorchScript.
        opset: ONNX opset (default 18 dynamo, 17 TorchScript). atol: allowed max |d logit|.

    The weights are stored inside the one .onnx file when they fit below protobuf's 2 GiB limit; above it they go
    to `path + '.data'` (`result['external_data']`), which must then travel with the .onnx file.
    Returns {"path", "max_abs_diff", "exporter", "opset", "dynamic_batch", "checked_batches", "external_data"}.
    Raises ExportError (before the exporter runs) for models with data-dependent shapes, and when the exporter
    fails or the difference exceeds atol.
    """
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (or None for a dynamic batch axis), got {batch_size}")
    name = getattr(model, "model_name", type(model).__name__)
    blocker = export_blocker(model)
    if blocker:
        raise ExportError(f"cannot export {name} to ONNX: {blocker}")
    model = model.eval()
    size = img_size or getattr(model, "img_size", 224)
    chans = getattr(model, "in_chans", 3)
    gen = torch.Generator().manual_seed(seed)
    dynamic = batch_size is None
    x = torch.randn(2 if dynamic else batch_size, chans, size, size, generator=gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = opset or (18 if dynamo else 17)
    external = weight_bytes(model) > EMBED_LIMIT
    data_file = path.with_name(path.name + ".data")
    if data_file.exists():
        data_file.unlink()  # a stale one from an earlier export would be silently paired with the new graph
    kwargs = dict(input_names=["image"], output_names=["logits"], opset_version=opset, dynamo=dynamo)
    if dynamo:
        kwargs["external_data"] = external
        if dynamic:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    elif dynamic:
        kwargs["dynamic_axes"] = {"image": {0: "batch"}, "logits": {0: "batch"}}
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), **kwargs)
        except Exception as e:  # the exporters raise many types; report one clear error
            raise ExportError(f"ONNX export of {name} failed ({'dynamo' if dynamo else 'torchscript'} exporter, "
                              f"opset {opset}{', dynamic batch' if dynamic else ''}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    result = {"path": str(path), "exporter": "dynamo" if dynamo else "torchscript", "opset": opset,
              "max_abs_diff": None, "dynamic_batch": dynamic, "checked_batches": [],
              "external_data": str(data_file) if data_file.exists() else None}
    if verify:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for b in (check_batches if dynamic else (batch_size,)):
            xb = torch.randn(b, chans, size, size, generator=gen)
            (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
            with torch.no_grad():
                ref = model(xb)
            diff = float((torch.from_numpy(onnx_logits) - ref).abs().max())
            worst = max(worst, diff)
            result["checked_batches"].append(b)
            if not diff <= atol:
                raise ExportError(f"exported ONNX logits differ from PyTorch by {diff:.2e} at batch {b} "
                                  f"(allowed {atol:.0e})")
        result["max_abs_diff"] = worst
    return result
