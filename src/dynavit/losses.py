"""Losses shared by the methods: soft-target (mixup / cutmix) and label-smoothed cross-entropy, and the logit
distillation of the methods that train against a dense teacher (DynamicViT, DynamicCNN / DynamicSwin).

Token labelling (LV-ViT) of a dense model's per-token scores against a teacher's is here too
(`token_label_loss`, used by `dynavit.train.criterion.TokenLabelCriterion`).

A method's own loss lives in its module (DynamicViT's in `dynavit.methods.dynamicvit`, DiT's budget loss in
`dynavit.losses_dit`) and reaches training through its spec's criterion factory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """mean_b sum_k -t_bk log softmax(logits)_bk for soft targets (B, K) (mixup / cutmix labels)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Soft-target CE when `target` is (B, K) float, else CE on class indices (B,) with label smoothing."""
    if target.is_floating_point() and target.shape == logits.shape:
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) of the class logits (B, K), temperature 1, summed over classes, mean over B."""
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                    log_target=True)


def per_token_kl(scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """KL(teacher || student) of per-token scores (B, N, K), summed over classes -> (B, N)."""
    return F.kl_div(F.log_softmax(scores, dim=-1), F.log_softmax(teacher_scores, dim=-1), reduction="none",
                    log_target=True).sum(dim=-1)


def token_label_loss(scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """Token labelling (LV-ViT, Jiang et al. 2021, Eq. 3 with a teacher's per-token scores as the dense labels):
    KL(teacher || student) of per-token scores (B, N, K), summed over classes, mean over tokens and images."""
    if scores.shape != teacher_scores.shape:
        raise ConfigError(f"token labels: the student's per-token scores {tuple(scores.shape)} and the teacher's "
                          f"{tuple(teacher_scores.shape)} must have the same (batch, tokens, classes); pick the "
                          f"student scale whose token grid is the teacher's")
    return per_token_kl(scores, teacher_scores).mean()
