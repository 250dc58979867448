"""Optimiser pieces: parameter groups, the cosine learning-rate and keep-rate schedules, and the model EMA.

Schedules are pure functions of the optimiser step, so a resumed run needs no scheduler object: its state is
the step number.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch
from torch import nn


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def param_groups(model: nn.Module, weight_decay: float, head_patterns=(), backbone_lr_scale: float = 1.0,
                 frozen_patterns=()) -> list:
    """AdamW groups: no weight decay for 1-d tensors, biases and tokens (timm); backbone vs head lr scale.

    Args:
        head_patterns: glob patterns of parameters trained at the full lr (e.g. a method's predictors);
            with backbone_lr_scale != 1 every other parameter is 'backbone' and gets lr x backbone_lr_scale.
        frozen_patterns: parameters never trained (e.g. 'cls_token', 'pos_embed'): requires_grad=False.
    """
    groups = {}
    for name, p in model.named_parameters():
        if _matches(name, frozen_patterns):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or _matches(name, ("cls_token", "dist_token", "pos_embed"))
        part = "head" if (backbone_lr_scale == 1.0 or _matches(name, head_patterns)) else "backbone"
        key = (part, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": 1.0 if part == "head" else backbone_lr_scale, "part": part}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


WARMUP_STYLES = ("linear", "linspace")


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, minimum: float = 0.0,
              warmup_start: float = 1e-6, style: str = "linear") -> float:
    """Linear warm-up from warmup_start to base over `warmup` steps, then cosine from base to minimum.

    style="linear": warmup_start + (base - warmup_start) * step / warmup (base is first reached at step `warmup`).
    style="linspace": step `step` of np.linspace(warmup_start, base, warmup), the DynamicViT release's
    `utils.cosine_scheduler` (base is reached at the last warm-up step, then the cosine starts at base again).
    """
    if warmup > 0 and step < warmup:
        if style == "linspace":
            return warmup_start + (base - warmup_start) * (step / (warmup - 1) if warmup > 1 else 0.0)
        return warmup_start + (base - warmup_start) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def keep_rate_at(step: int, target: float, start: int, length: int) -> float:
    """Keep-rate schedule (docs/methods.md 4): 1 until `start`, then target + (1 - target)(cos(pi t / T) + 1) / 2."""
    if step < start:
        return 1.0
    if length <= 0 or step >= start + length:
        return target
    return target + (1.0 - target) * (math.cos(math.pi * (step - start) / length) + 1.0) / 2.0


class ModelEma:
    """Exponential moving average of a model's floating-point state (DeiT's ModelEma): ema = d ema + (1-d) w."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            e = self.state[k]
            if e.is_floating_point():
                e.mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                e.copy_(v)

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
