"""Training losses: plain (soft-target / label-smoothed) cross-entropy and DynamicViT's loss (METHODS 3.3).

    L = clf_weight * CE(y, t) + ratio_weight / S * sum_s mean_b (mean_n D_s - rho_s)^2
        + distill_weight * KL(teacher || student logits) + distill_weight * token distillation

Token distillation is the MSE between kept final tokens and the teacher's (DeiT) or the KL between per-token
`aux_head` scores (LV-ViT), over the tokens kept at the last stage. Weights 1 / 2 (5 for DeiT-B) / 0.5.
The teacher is the dense model, frozen, in eval mode, on the same (mixed) batch.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

TOKEN_LOSSES = ("mse", "kl")


# ---------------------------------------------------------------------------------------------- classification
def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """mean_b sum_k -t_bk log softmax(logits)_bk for soft targets (B, K) (mixup / cutmix labels)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Soft-target CE when `target` is (B, K) float, else CE on class indices (B,) with label smoothing."""
    if target.is_floating_point() and target.shape == logits.shape:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


class SoftTargetCrossEntropy(nn.Module):
    """`classification_loss` as a module: soft targets, or class indices with label smoothing."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return classification_loss(logits, target, self.smoothing)


# ---------------------------------------------------------------------------------------------- DynamicViT parts
def keep_ratio_loss(decisions: Sequence[Tensor], keep_ratios: Sequence[float]) -> Tensor:
    """sum_s mean_b (mean_n D_s - rho_s)^2 over decisions D_s (B, N) (unweighted, not divided by S)."""
    if len(decisions) != len(keep_ratios):
        raise ConfigError(f"got {len(decisions)} stages of decisions but {len(keep_ratios)} keep ratios "
                          f"{list(keep_ratios)}")
    return sum(((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, keep_ratios))


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) of the class logits (B, K), temperature 1, summed over classes, mean over B."""
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                    log_target=True)


def masked_token_mse(tokens: Tensor, teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the kept tokens (mask (B, N) > 0.5) and channels; 0 if nothing is kept."""
    keep = (mask > 0.5).to(tokens.dtype)  # (B, N)
    err = ((tokens - teacher_tokens) ** 2).sum(dim=-1)  # (B, N)
    return (err * keep).sum() / (keep.sum() * tokens.shape[-1]).clamp_min(1.0)


def masked_token_kl(scores: Tensor, teacher_scores: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher || student) of per-token scores (B, N, K), mean over kept tokens; 0 if nothing is kept."""
    keep = (mask > 0.5).to(scores.dtype)
    kl = F.kl_div(F.log_softmax(scores, dim=-1), F.log_softmax(teacher_scores, dim=-1), reduction="none",
                  log_target=True).sum(dim=-1)  # (B, N)
    return (kl * keep).sum() / keep.sum().clamp_min(1.0)


def dynamicvit_loss(outputs, target: Tensor, teacher_logits: Optional[Tensor], teacher_tokens: Optional[Tensor],
                    keep_ratios: Sequence[float], clf_weight: float = 1.0, ratio_weight: float = 2.0,
                    distill_weight: float = 0.5, token_loss: str = "mse", smoothing: float = 0.0):
    """The DynamicViT loss on a training-mode `DynamicViTOutput`; returns (total, parts dict of the 4 terms).

    teacher_tokens: (B, N, C) final-norm teacher patch tokens ('mse') or (B, N, K) aux_head scores ('kl').
    Without a teacher (teacher_logits None) only classification and ratio terms are used.
    """
    cls = classification_loss(outputs.logits, target, smoothing)
    ratio = keep_ratio_loss(outputs.decisions, keep_ratios)
    total = clf_weight * cls + ratio_weight * ratio / len(keep_ratios)
    zero = cls.new_zeros(())
    kl, tok = zero, zero
    if teacher_logits is not None:
        kl = logit_distillation(outputs.logits, teacher_logits)
        if token_loss == "mse":
            tok = masked_token_mse(outputs.tokens, teacher_tokens, outputs.mask)
        else:
            if outputs.aux_logits is None:
                raise ConfigError("token_loss 'kl' needs per-token aux_head scores (an LV-ViT model)")
            tok = masked_token_kl(outputs.aux_logits, teacher_tokens, outputs.mask)
        total = total + distill_weight * kl + distill_weight * tok
    return total, {"cls": cls, "ratio": ratio, "kl": kl, "token": tok}


# ---------------------------------------------------------------------------------------------- teacher
def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode dense copy of `model` (its reducer and predictors removed)."""
    teacher = copy.deepcopy(model)
    teacher.reducer = None
    if hasattr(teacher, "score_predictor"):
        del teacher.score_predictor
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(class logits (B, K), token targets): final patch tokens (B, N, C), or aux_head scores (B, N, K) for LV-ViT."""
    if getattr(teacher, "reducer", None) is not None:
        raise ConfigError("the DynamicViT teacher must be the dense model; build it with make_teacher(model)")
    state = teacher.forward_state(x)
    tokens = state.x[:, state.num_prefix:]
    aux_head = getattr(teacher, "aux_head", None)
    if aux_head is not None:
        return teacher.head(state.x[:, 0]), aux_head(tokens)
    logits = teacher.forward_head(state.x)
    return (logits[0] if isinstance(logits, tuple) else logits), tokens


class DynamicViTLoss(nn.Module):
    """DynamicViT's training loss with its teacher (METHODS 3.3). `forward(images, outputs, target) -> loss`.

    Args:
        teacher: the dense model (frozen, kept in eval mode), or None for classification + ratio only.
        keep_ratios: cumulative keep ratios per stage ([rho, rho^2, rho^3]), e.g. `model.reducer.keep_ratios`.
        token_loss: 'mse' (DeiT) or 'kl' (LV-ViT aux_head scores); None picks by the teacher's aux_head.
        clf_weight, ratio_weight (2; 5 for DeiT-B), distill_weight: the term weights.
        smoothing: label smoothing for integer targets (soft targets are used as given).
    The last parts are kept in `self.last_parts` (detached tensors, no host sync) for logging.
    """

    def __init__(self, teacher: Optional[nn.Module], keep_ratios: Sequence[float], token_loss: Optional[str] = None,
                 clf_weight: float = 1.0, ratio_weight: float = 2.0, distill_weight: float = 0.5,
                 smoothing: float = 0.0):
        super().__init__()
        if token_loss is None:
            token_loss = "kl" if getattr(teacher, "aux_head", None) is not None else "mse"
        if token_loss not in TOKEN_LOSSES:
            raise ConfigError(f"token_loss must be one of {list(TOKEN_LOSSES)}, got {token_loss!r}")
        self.teacher = teacher.eval() if teacher is not None else None
        self.keep_ratios = list(keep_ratios)
        self.token_loss = token_loss
        self.clf_weight, self.ratio_weight, self.distill_weight = clf_weight, ratio_weight, distill_weight
        self.smoothing = smoothing
        self.last_parts: dict = {}

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "DynamicViTLoss":
        """The authors' setup for a DynamicViT `model`: dense frozen teacher, its keep ratios, ratio weight 5 for
        DeiT-B (2 otherwise), MSE token loss for DeiT and aux-score KL for LV-ViT."""
        if getattr(model, "reducer", None) is None or not hasattr(model.reducer, "keep_ratios"):
            raise ConfigError("DynamicViTLoss.for_model needs a model built with method='dynamicvit'")
        name = str(getattr(model, "model_name", ""))
        kwargs.setdefault("ratio_weight", 5.0 if "deit_base" in name else 2.0)
        return cls(make_teacher(model), model.reducer.keep_ratios, **kwargs)

    def train(self, mode: bool = True) -> "DynamicViTLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays frozen in eval mode
        return self

    def forward(self, images: Tensor, outputs, target: Tensor) -> Tensor:
        t_logits, t_tokens = teacher_outputs(self.teacher, images) if self.teacher is not None else (None, None)
        total, parts = dynamicvit_loss(outputs, target, t_logits, t_tokens, self.keep_ratios, self.clf_weight,
                                       self.ratio_weight, self.distill_weight, self.token_loss, self.smoothing)
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return total
