"""The loss interface of the training engine: `criterion(images, outputs, target) -> scalar loss`.

`outputs` is whatever the model's training forward returns (logits, DeiT's (cls, dist) pair, a method's own
training output with a `logits` field, ...), `target` is class indices (B,) or soft targets (B, K), `images` the
augmented batch (for a teacher). A criterion may keep detached tensors in `last_parts` for logging, take
`set_progress(fraction)` for schedules, and set `needs_info = True` to receive `(outputs, ReductionInfo)`.
A method or model family brings its own criterion through its spec (`criterion(model, smoothing=, distill=)`);
everything else trains with `ClassificationCriterion`. `TokenLabelCriterion` wraps any of them with token
labelling from a teacher's per-token scores (`dynavit train --token-teacher`).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import classification_loss, token_label_loss
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


class TokenLabelCriterion(nn.Module):
    """`base(images, logits, target) + weight * token_label_loss(student token scores, teacher token scores)`.

    The model's training forward returns an output with `logits` and `token_scores` (B, N, K) (e.g. PVTv2 built
    with `token_head_scale`); the frozen teacher gives `teacher.token_scores(images)` on the same token grid
    (e.g. `demo_cnn`, whose 14 x 14 tokens at 112 px are PVTv2's 1/8 map). LV-ViT's dense supervision: every
    token is told what the teacher sees there, which a class label alone says only for the whole image.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, weight: float = 0.5):
        super().__init__()
        if not hasattr(teacher, "token_scores"):
            raise ConfigError(f"token labels need a teacher with per-token scores (token_scores), got "
                              f"{type(teacher).__name__}")
        if not weight > 0:
            raise ConfigError(f"the token-label weight must be > 0, got {weight!r}")
        self.base, self.weight = base, float(weight)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.last_parts: dict = {}

    def train(self, mode: bool = True) -> "TokenLabelCriterion":
        super().train(mode)
        self.teacher.eval()  # frozen, in eval mode (its BatchNorm statistics stay)
        return self

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        scores = getattr(outputs, "token_scores", None)
        if scores is None:
            raise ConfigError("token labels need a model whose training forward returns per-token scores (e.g. "
                              "pvt_v2_* with --set token_head_scale=1)")
        with torch.no_grad():
            teacher_scores = self.teacher.token_scores(images)  # (B, N, K)
        cls = self.base(images, outputs.logits, target)
        token = token_label_loss(scores, teacher_scores.to(scores.dtype))
        self.last_parts = {"cls": cls.detach(), "token": token.detach()}
        return cls + self.weight * token
