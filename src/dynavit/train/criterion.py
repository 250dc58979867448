"""The loss interface of the training engine: `criterion(images, outputs, target) -> scalar loss`.

`outputs` is whatever the model's training forward returns (logits, DeiT's (cls, dist) pair, a method's own
training output with a `logits` field, ...), `target` is class indices (B,) or soft targets (B, K), `images` the
augmented batch (for a teacher). A criterion may keep detached tensors in `last_parts` for logging, take
`set_progress(fraction)` for schedules, and set `needs_info = True` to receive `(outputs, ReductionInfo)`.
A method or model family brings its own criterion through its spec (`criterion(model, smoothing=, distill=)`);
everything else trains with `ClassificationCriterion`.
"""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

from ..losses import classification_loss
from ..registry import get_spec


class ClassificationCriterion(nn.Module):
    """Cross-entropy on class indices (label smoothing) or soft targets; DeiT's (cls, dist) pair is averaged."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing
        self.last_parts: dict = {}

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        logits = getattr(outputs, "logits", outputs)
        if isinstance(logits, (tuple, list)):
            return sum(classification_loss(x, target, self.smoothing) for x in logits) / len(logits)
        return classification_loss(logits, target, self.smoothing)


def build_criterion(model: nn.Module, factory: Union[None, str, Callable[..., nn.Module]] = None,
                    smoothing: float = 0.0, distill: bool = True, **options) -> nn.Module:
    """The criterion of a spec (`spec.criterion`, or the spec's name: a method or model family), or cross-entropy
    when it has none (None or 'classification'). `options` go to the factory (e.g. DiT's `start`, `weight`).
    A factory may copy `model` (a dense teacher), so call this after loading the initial weights."""
    if isinstance(factory, str) and factory != "classification":
        factory = get_spec(factory).criterion
    if factory is None or factory == "classification":
        return ClassificationCriterion(smoothing)
    return factory(model, smoothing=smoothing, distill=distill, **options)
