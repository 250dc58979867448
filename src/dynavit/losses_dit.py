"""DiT's budget constraint (docs/dit.md section 3): w * (E_batch[GMACs] / GMACs_twin - budget)^2 after a warm-up."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .errors import ConfigError
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
        twin = info.extra.get("gmacs_twin", info.extra.get("gmacs_full"))
        return budget_loss(gmacs, twin, budget, self.weight)

    def active(self, progress: float) -> bool:
        """Whether the loss is on at this fraction of training."""
        return progress >= self.warmup

    def extra_repr(self) -> str:
        return f"budget={self.budget}, weight={self.weight}, warmup={self.warmup}"
