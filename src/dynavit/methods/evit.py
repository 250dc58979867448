"""EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to, fuse the rest (docs/methods.md 4).

Inside blocks [3, 6, 9], after the attention residual: the `ceil(rho * T)` non-prefix tokens with the highest
head-averaged class attention are kept (in descending score order, as the authors' `topk(sorted=True)`), and with
`fuse=True` the others are fused into one token `sum_i a_i x_i` with the raw, un-normalised attention weights
(the authors' code). Output `[cls, kept by score, fused]`; the fused token of one stage is an ordinary candidate
at the next. At keep_rate 1 (ceil(rho T) == T) a stage does nothing, like the authors' early return.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..recipes import Recipe
from ..registry import register_method
from ..tokens import TokenState, merge_tokens, select_tokens
from ._common import StageReducer, keep_count, patch_scores, record_extra


def topk_index(scores: Tensor, k: int) -> Tensor:
    """scores (B, T) -> indices (B, k) of the k largest, descending (ties: torch.topk's order)."""
    return scores.topk(k, dim=1, largest=True, sorted=True).indices


def fuse_groups(keep_index: Tensor, num_tokens: int) -> Tensor:
    """Group map (B, T) for EViT fusion: kept token j -> its rank in keep_index, every other token -> k."""
    B, k = keep_index.shape
    group = keep_index.new_full((B, num_tokens), k)
    return group.scatter_(1, keep_index, torch.arange(k, device=keep_index.device).expand(B, k))


def evit_reduce(state: TokenState, scores: Tensor, k: int, fuse: bool) -> tuple[TokenState, Tensor]:
    """Keep the top-k tokens by class attention `scores` (B, T); fuse the rest (raw attention-weighted sum)."""
    with torch.no_grad():
        keep_index = topk_index(scores, k)  # (B, k)
    if not fuse:
        return select_tokens(state, keep_index), keep_index
    group = fuse_groups(keep_index, state.num_tokens)  # (B, T)
    weight = torch.where(group < k, torch.ones_like(scores), scores)  # kept: x * 1, rest: a_i x_i
    return merge_tokens(state, group, weight, k + 1, normalize=False), keep_index


class EViTReducer(StageReducer):
    name = "evit"

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None, fuse: bool = True):
        super().__init__(depth, keep_rate, locations)
        self.fuse = bool(fuse)

    def reduce(self, state: TokenState, cls_attn: Optional[Tensor], keys: Optional[Tensor],
               keep_rate: float) -> TokenState:
        k = keep_count(keep_rate, state.num_tokens)
        state, keep_index = evit_reduce(state, patch_scores(state, cls_attn), k, self.fuse)
        record_extra(state, "keep_index", keep_index)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fuse={self.fuse}"


# EViT trains 300 epochs with the keep rate at 1 for 10 epochs, then a cosine to rho over 100 epochs
# ((start, length) fractions of training); its fine-tune keeps rho from the first step (shrink_start_epoch 0,
# shrink_epochs 0).
KEEP_SCHEDULE = (10 / 300, 100 / 300)
RECIPE = Recipe("evit", "EViT fine-tune (BAT paper's 30-epoch recipe): lr 2e-5 x B/512, min 2e-6, wd 1e-6, keep-rate "
                "cosine 1 -> rho", epochs=30, lr=2e-5, lr_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
                keep_schedule=KEEP_SCHEDULE)
INFO_FIELDS = {"keep_index": "per stage, (B, k) indices of the kept tokens among those entering the stage"}


@register_method("evit", params=("keep_rate", "locations", "fuse"), families=("vit",), recipe=RECIPE,
                 attention_extras=("need_cls_attn",), identity={"keep_rate": 1.0}, info_fields=INFO_FIELDS)
def apply_evit(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
               locations: Optional[Sequence[int]] = None, fuse: bool = True) -> nn.Module:
    """EViT: keep the ceil(rho*T) most class-attended tokens at each location, fuse the rest into one token.

    Args:
        keep_rate: rho in (0, 1] (or one per location); change it later with `model.reducer.set_keep_rate`.
        locations: blocks acting between attention and MLP (default [3, 6, 9] at depth 12, [4, 8, 12] at 16).
        fuse: fuse the inattentive tokens into one (True, EViT) or drop them (False).
    """
    model.reducer = EViTReducer(len(model.blocks), keep_rate, locations, fuse)
    return model
