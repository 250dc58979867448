"""Shared parts of the reducers: block locations, keep rates and the class-attention stage reducer.

EViT, BAT and the baselines act inside a few blocks, between attention and MLP (docs/methods.md sections 2, 4,
5). They ask the attention for its head-averaged class row only at those blocks, so every other block keeps its
plain fused path. DynamicViT uses the same location rule and checks (`stage_locations`, `check_locations`).
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..errors import ConfigError, check_keep_rate
from ..reduction import TokenReducer
from ..tokens import TokenState

# EViT / BAT locations (0-based block indices) are `stage_locations`: layers 4, 7, 10 of 12-block models; at depth
# 16 (LV-ViT-S) the 0-based (4, 8, 12) that reproduce the published GMACs (BAT 4.7, EViT 4.7 / 3.9; (3, 7, 11)
# gives 4.51), named `LVVIT_S_LOCATIONS` (docs/bat.md). The demo backbone is 12 blocks deep.
LVVIT_S_LOCATIONS = (4, 8, 12)


def stage_locations(depth: int, num_stages: int = 3) -> tuple:
    """Blocks depth * s // (S + 1) for s = 1..S: (3, 6, 9) at depth 12, (4, 8, 12) at 16, (5, 10, 15) at 20."""
    locs = tuple(depth * s // (num_stages + 1) for s in range(1, num_stages + 1))
    if depth < num_stages + 1 or len(set(locs)) != len(locs) or locs[0] < 1:
        raise ConfigError(f"no default locations for depth {depth} with {num_stages} stages; pass the locations "
                          f"explicitly (a list of increasing block indices in [0, {depth}))")
    return locs


def check_locations(locations: Optional[Sequence[int]], depth: int, name: str = "locations") -> tuple:
    """Validate block indices (ints, strictly increasing, in [0, depth)); None -> `stage_locations(depth)`."""
    if locations is None:
        return stage_locations(depth)
    try:
        locs = tuple(operator.index(i) for i in locations)
    except TypeError:
        locs = None
    if not locs or any(isinstance(i, bool) for i in locations) or locs[0] < 0 or locs[-1] >= depth \
            or any(a >= b for a, b in zip(locs, locs[1:])):
        raise ConfigError(f"{name} must be a non-empty, strictly increasing list of block indices in "
                          f"[0, {depth}), got {locations!r}")
    return locs


def parse_keep_rates(keep_rate: Union[float, Sequence[float]], num_stages: int) -> tuple:
    """One rate for every location, or one per location; each in (0, 1]."""
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) != num_stages:
            raise ConfigError(f"keep_rate list {list(keep_rate)} must have one rate per location ({num_stages})")
        return tuple(check_keep_rate(r) for r in keep_rate)
    return (check_keep_rate(keep_rate),) * num_stages


def keep_count(keep_rate: float, num_tokens: int) -> int:
    """EViT's attentive-token count ceil(rho * T) (the authors' float expression, so counts match theirs)."""
    return min(num_tokens, max(1, math.ceil(keep_rate * num_tokens)))


def patch_scores(state: TokenState, cls_attn: Optional[Tensor]) -> Tensor:
    """(B, P+T) class-attention row -> (B, T) scores of the non-prefix tokens (un-renormalised, like EViT)."""
    if cls_attn is None:
        raise RuntimeError("the attention did not return the class-attention row (need_cls_attn)")
    return cls_attn[:, state.num_prefix:]


class StageReducer(TokenReducer):
    """A reducer acting at fixed blocks with one keep rate each; subclasses implement `reduce`."""

    needs_cls_attn = True

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None):
        self.locations = check_locations(locations, depth)
        self._stage = {b: s for s, b in enumerate(self.locations)}
        self.set_keep_rate(keep_rate)

    def set_keep_rate(self, keep_rate: Union[float, Sequence[float]]) -> None:
        """Change the keep rate(s) at run time (training schedules lower them from 1 to rho)."""
        self.keep_rates = parse_keep_rates(keep_rate, len(self.locations))

    def attention_args(self, i: int, state: TokenState) -> dict:
        return {"need_cls_attn": True} if self.needs_cls_attn and i in self._stage else {}

    def after_attention(self, model: nn.Module, i: int, state: TokenState, cls_attn: Optional[Tensor],
                        keys: Optional[Tensor]) -> TokenState:
        s = self._stage.get(i)
        if s is None:
            return state
        if keep_count(self.keep_rates[s], state.num_tokens) < state.num_tokens:  # else the stage keeps all
            state = self.reduce(state, cls_attn, keys, self.keep_rates[s], **self.stage_inputs(model, s))
        state.record_stage()
        return state

    def stage_inputs(self, model: nn.Module, s: int) -> dict:
        """Further keyword arguments of `reduce` at stage s, read from the model (e.g. its patch grid)."""
        return {}

    def reduce(self, state: TokenState, cls_attn: Optional[Tensor], keys: Optional[Tensor],
               keep_rate: float) -> TokenState:
        """One stage that removes tokens: cls_attn (B, P+T) class-attention row, keys (B, P+T, d) if requested."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        rates = self.keep_rates[0] if len(set(self.keep_rates)) == 1 else list(self.keep_rates)
        return f"keep_rate={rates}, locations={list(self.locations)}"


def record_extra(state: TokenState, key: str, value) -> None:
    """Append a per-stage record to info.extra[key] when the caller asked for return_info."""
    if state.info is not None:
        state.info.extra.setdefault(key, []).append(value)
