"""Evaluation metrics: top-k accuracy and BAT's token-diversity score."""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError


CENTERS = ("medoid", "median")


def diversity_score(tokens: Tensor, center: str = "medoid") -> Tensor:
    """Token diversity, BAT Eq. 4: r(Z) = ||Z - 1 z^T||_1 with z = argmin_{z'} ||Z - 1 z'^T||_1 (l1 norm).

    tokens: (B, N, C) or (N, C) -> (B,) or scalar; larger = more diverse.
    center="medoid" (the paper: z and z' are among the tokens): z is the token whose total l1 distance to all
        tokens is smallest, so r(Z) = min_m sum_i ||z_i - z_m||_1.
    center="median": z' ranges over all of R^C; the minimiser is the coordinate-wise median (it minimises each
        coordinate's l1 sum), a lower bound of the medoid's score.
    """
    if center not in CENTERS:
        raise ConfigError(f"diversity_score center must be one of {list(CENTERS)}, got {center!r}")
    squeeze = tokens.ndim == 2
    z = (tokens.unsqueeze(0) if squeeze else tokens).float()
    if center == "median":
        score = (z - z.median(dim=1, keepdim=True).values).abs().sum(dim=(1, 2))  # (B,)
    else:
        score = torch.cdist(z, z, p=1).sum(dim=1).min(dim=1).values  # (B, N, N) -> total per candidate -> min
    return score[0] if squeeze else score
