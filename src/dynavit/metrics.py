"""Evaluation metrics: top-k accuracy and BAT's token-diversity score."""
from __future__ import annotations

import torch
from torch import Tensor


def diversity_score(tokens: Tensor) -> Tensor:
    """Token diversity, BAT Eq. 4: r(Z) = ||Z - 1 z^T||_1 with z the coordinate-wise median token.

    tokens: (B, N, C) or (N, C) -> (B,) or scalar. The median minimises the l1 distance coordinate by coordinate,
    so this is the smallest total l1 distance of the tokens to any single token; larger = more diverse.
    """
    squeeze = tokens.ndim == 2
    z = tokens.unsqueeze(0) if squeeze else tokens
    center = z.float().median(dim=1, keepdim=True).values  # (B, 1, C)
    score = (z.float() - center).abs().sum(dim=(1, 2))
    return score[0] if squeeze else score
