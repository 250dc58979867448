"""The loss interface of the training engine: `criterion(images, outputs, target) -> scalar loss`.

`outputs` is whatever the model's training forward returns (logits, DeiT's (cls, dist) pair, DynamicViT's
`DynamicViTOutput`, ...), `target` is class indices (B,) or soft targets (B, K), `images` the augmented batch
(for a teacher). A criterion may keep detached tensors in `last_parts` for logging, and may take
`set_progress(fraction)` for schedules (DiT's budget loss). Method losses are imported lazily, so the engine
runs the dense model whether or not they are installed.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from ..errors import ConfigError


def _classification(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    from ..losses import classification_loss

    return classification_loss(logits, target, smoothing)


class ClassificationCriterion(nn.Module):
    """Cross-entropy on class indices (label smoothing) or soft targets; DeiT's (cls, dist) pair is averaged."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing
        self.last_parts: dict = {}

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        logits = getattr(outputs, "logits", outputs)
        if isinstance(logits, (tuple, list)):
            return sum(_classification(x, target, self.smoothing) for x in logits) / len(logits)
        return _classification(logits, target, self.smoothing)


class BudgetCriterion(nn.Module):
    """Classification plus a method's budget loss, which is 0 during its warm-up (DiT, METHODS 7).

    The engine calls `set_progress(step / total_steps)` before every step; the criterion passes that progress to
    the budget loss (`budget_loss(info, progress=...)`), whose `warmup` decides when it switches on. `start`, if
    given, sets that warm-up (the recipe's `budget_start`). `needs_info`: the engine calls the model with
    `return_info=True`, so `outputs` is (logits, ReductionInfo).
    """

    needs_info = True

    def __init__(self, budget_loss: nn.Module, smoothing: float = 0.0, start: Optional[float] = None):
        super().__init__()
        self.cls = ClassificationCriterion(smoothing)
        self.budget_loss = budget_loss
        if start is not None:
            self.budget_loss.warmup = float(start)
        self.progress = 0.0
        self.last_parts: dict = {}

    @property
    def start(self) -> float:
        return float(getattr(self.budget_loss, "warmup", 0.0))

    @property
    def enabled(self) -> bool:
        return self.progress >= self.start

    def set_progress(self, fraction: float) -> None:
        self.progress = float(fraction)

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        logits, info = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = self.cls(images, getattr(logits, "logits", logits), target)
        self.last_parts = {"cls": loss.detach()}
        if self.enabled:
            if info is None:
                raise ConfigError("the budget loss needs the routing info: call the model with return_info=True")
            budget = self.budget_loss(info, progress=self.progress)
            self.last_parts["budget"] = budget.detach()
            loss = loss + budget
        return loss


def _dit_budget_loss(model: nn.Module, budget: Optional[float], weight: Optional[float]) -> nn.Module:
    try:
        from .. import losses_dit
    except ImportError:
        raise ConfigError("DiT training needs dynavit.losses_dit (not installed in this version)") from None
    cls = getattr(losses_dit, "BudgetLoss", None) or getattr(losses_dit, "DiTBudgetLoss", None)
    if cls is None:
        raise ConfigError("dynavit.losses_dit has no BudgetLoss class")
    kwargs = {"budget": budget, "weight": weight}
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k in accepted}
    return cls.for_model(model, **kwargs) if hasattr(cls, "for_model") else cls(**kwargs)


def build_criterion(model: nn.Module, kind: str = "classification", smoothing: float = 0.0,
                    distill: bool = True, budget: Optional[float] = None, budget_weight: Optional[float] = None,
                    budget_start: float = 0.4) -> nn.Module:
    """The criterion a recipe asks for. `kind`: 'classification', 'dynamicvit' / 'dynamic_hier' (DynamicCNN,
    DynamicSwin; with the dense teacher copied from `model` as it is now, so call this after loading the initial
    weights) or 'budget' (DiT)."""
    if kind == "classification":
        return ClassificationCriterion(smoothing)
    if kind == "dynamicvit":
        from ..losses import DynamicViTLoss

        if distill:
            return DynamicViTLoss.for_model(model, smoothing=smoothing)
        return DynamicViTLoss(None, model.reducer.keep_ratios, smoothing=smoothing)
    if kind == "dynamic_hier":  # DynamicCNN / DynamicSwin
        from ..methods.dynamic_hier import DynamicHierLoss

        return DynamicHierLoss.for_model(model, distill=distill, smoothing=smoothing)
    if kind == "budget":
        return BudgetCriterion(_dit_budget_loss(model, budget, budget_weight), smoothing, budget_start)
    raise ConfigError(f"unknown criterion {kind!r}; known: classification, dynamicvit, dynamic_hier, budget")
