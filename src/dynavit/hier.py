"""The interface between a hierarchical backbone (ConvNeXt, Swin) and a method that acts on a whole stage.

Tokens cannot be removed from a hierarchical model: depthwise convolutions and shifted windows need the full
grid. A `MapReducer` therefore takes over one stage of the backbone (`stage`, 0-based; DynamicCNN and
DynamicSwin use stage 2, the 1/16-resolution map) and returns that stage's output map; the backbone runs the
other stages itself:

    x = model.downsample(s, x)
    x = reducer.run_stage(model, s, x, ctx) if s == reducer.stage else model.run_stage(s, x)
    ...
    out = reducer.finalize(model, ctx, logits, features)

`ctx` is the per-forward `MapContext` (never stored on a module): `info` is the `ReductionInfo` when the caller
asked for `return_info`, `aux` a scratch dict for the method (training decisions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from .reduction import TokenReducer
from .tokens import ReductionInfo


@dataclass
class MapContext:
    """Per-forward state of a hierarchical model's forward."""

    info: Optional[ReductionInfo] = None
    aux: dict = field(default_factory=dict)


class HierarchicalModel(nn.Module):
    """What ConvNeXt and Swin share around a MapReducer: `forward` runs `forward_features(x, ctx)` (the reducer
    takes its stage there), `forward_head`, then the reducer's `finalize`."""

    reducer: Optional["MapReducer"] = None

    def forward(self, x: Tensor, return_info: bool = False):
        """Logits (B, classes); with return_info, (logits, ReductionInfo)."""
        ctx = MapContext(info=ReductionInfo() if return_info else None)
        features = self.forward_features(x, ctx)
        out = self.forward_head(features)
        if self.reducer is not None:
            out = self.reducer.finalize(self, ctx, out, features)
        return (out, ctx.info) if return_info else out

    def extra_repr(self) -> str:
        return f"reducer={self.reducer!r}" if self.reducer is not None else ""


class MapReducer(TokenReducer):
    """Base class of the methods for hierarchical backbones: they replace one stage's forward."""

    stage = 2

    def run_stage(self, model: nn.Module, s: int, x: Tensor, ctx: MapContext) -> Tensor:
        return model.run_stage(s, x)

    def finalize(self, model: nn.Module, ctx: MapContext, logits: Tensor, features: Optional[Tensor] = None) -> Any:
        """What forward returns (logits; the methods' loss inputs while training)."""
        return logits
