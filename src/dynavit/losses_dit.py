"""DiT's training loss (docs/dit.md section 3): classification plus the budget constraint
w * (E_batch[GMACs] / GMACs_twin - budget)^2 after a warm-up. `dit_criterion` is what `dynavit train` builds for a
DiT model (the DiT family spec's criterion factory, registered in `dynavit.models.dit`)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .errors import ConfigError
from .losses import classification_loss
from .models.dit import budget_loss, check_budget
from .tokens import ReductionInfo


class DiTBudgetLoss(nn.Module):
    """Budget loss on the per-image GMACs a DiT forward reports (`model(x, return_info=True)`).

    Args:
        budget: target fraction of the PVTv2 twin's GMACs; None = read `info.extra['budget']` (the model's).
        weight: w. warmup: fraction of training (progress in [0, 1]) during which the loss is 0; the training
            engine passes the progress through `BudgetCriterion.set_progress`.
    """

    def __init__(self, budget: Optional[float] = None, weight: float = 4.0, warmup: float = 0.2):
        super().__init__()
        self.budget = None if budget is None else check_budget(budget)
        if weight < 0:
            raise ConfigError(f"budget loss weight must be >= 0, got {weight!r}")
        if not 0.0 <= warmup < 1.0:
            raise ConfigError(f"warmup must be a fraction of training in [0, 1), got {warmup!r}")
        self.weight, self.warmup = weight, warmup

    def forward(self, info: ReductionInfo, progress: float = 1.0) -> Tensor:
        """progress: fraction of training done (0 at the start, 1 at the end)."""
        gmacs = info.extra["gmacs"]
        if not self.active(progress):
            return gmacs.new_zeros(())
        budget = self.budget if self.budget is not None else info.extra["budget"]
        return budget_loss(gmacs, info.extra["gmacs_twin"], budget, self.weight)

    def active(self, progress: float) -> bool:
        """Whether the loss is on at this fraction of training."""
        return progress >= self.warmup

    def extra_repr(self) -> str:
        return f"budget={self.budget}, weight={self.weight}, warmup={self.warmup}"


class BudgetCriterion(nn.Module):
    """Classification plus a budget loss, which is 0 during its warm-up (docs/dit.md section 3).

    The engine calls `set_progress(step / total_steps)` before every step; the criterion passes that progress to
    the budget loss (`budget_loss(info, progress=...)`), whose `warmup` decides when it switches on. `start`, if
    given, sets that warm-up. `needs_info`: the engine calls the model with `return_info=True`, so `outputs` is
    (logits, ReductionInfo).
    """

    needs_info = True

    def __init__(self, budget_loss: nn.Module, smoothing: float = 0.0, start: Optional[float] = None):
        super().__init__()
        self.smoothing = smoothing
        self.budget_loss = budget_loss
        if start is not None:
            self.budget_loss.warmup = float(start)
        self.progress = 0.0
        self.last_parts: dict = {}

    @property
    def start(self) -> float:
        return float(self.budget_loss.warmup)

    @property
    def enabled(self) -> bool:
        return self.budget_loss.active(self.progress)

    def set_progress(self, fraction: float) -> None:
        self.progress = float(fraction)

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        logits, info = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = classification_loss(getattr(logits, "logits", logits), target, self.smoothing)
        self.last_parts = {"cls": loss.detach()}
        if self.enabled:
            if info is None:
                raise ConfigError("the budget loss needs the routing info: call the model with return_info=True")
            budget = self.budget_loss(info, progress=self.progress)
            self.last_parts["budget"] = budget.detach()
            loss = loss + budget
        return loss


def dit_criterion(model: nn.Module, smoothing: float = 0.0, distill: bool = False, start: float = 0.4,
                  weight: float = 4.0, budget: Optional[float] = None) -> nn.Module:
    """Classification + the budget loss (weight w, at `budget`, default the model's own `info.extra['budget']`),
    on after `start` of training (the DiT recipe's 40%)."""
    return BudgetCriterion(DiTBudgetLoss(budget, weight), smoothing, start)
