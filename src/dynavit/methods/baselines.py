"""Pruning baselines at the EViT / BAT locations: `topk` (class-attention pruning, no fusion) and `random`.

`topk` keeps the ceil(rho * T) tokens with the highest head-averaged class attention and drops the rest (EViT
with `fuse=False`; BAT's ablation (i) "keep attentive tokens"). `random` keeps the same number of tokens chosen
uniformly at random per image (DynamicViT's "random selection" ablation); it needs no attention extras. Dropped
patches map to -1 in `info.patch_to_token`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..registry import register_method
from ..tokens import TokenState, select_tokens
from ._common import StageReducer, keep_count, record_extra
from .evit import INFO_FIELDS, RECIPE, EViTReducer


class TopKReducer(EViTReducer):
    name = "topk"

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None):
        super().__init__(depth, keep_rate, locations, fuse=False)

    def extra_repr(self) -> str:
        return StageReducer.extra_repr(self)


def random_keep_index(batch: int, num_tokens: int, k: int, device, generator=None) -> Tensor:
    """(B, k) distinct random token indices per image (top-k of uniform noise: batched, no loop)."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return noise.topk(k, dim=1).indices


class RandomReducer(StageReducer):
    name = "random"
    needs_cls_attn = False

    def __init__(self, depth: int, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None, seed: Optional[int] = None):
        super().__init__(depth, keep_rate, locations)
        self.seed = seed
        self._generator = None

    def reduce(self, state: TokenState, cls_attn: Optional[Tensor], keys: Optional[Tensor],
               keep_rate: float) -> TokenState:
        T = state.num_tokens
        k = keep_count(keep_rate, T)
        dev = state.x.device
        if self.seed is not None and (self._generator is None or self._generator.device != dev):
            self._generator = torch.Generator(device=dev).manual_seed(self.seed)
        keep_index = random_keep_index(state.x.shape[0], T, k, dev, self._generator)
        record_extra(state, "keep_index", keep_index)
        return select_tokens(state, keep_index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


@register_method("topk", params=("keep_rate", "locations"), families=("vit",), recipe=RECIPE,
                 attention_extras=("need_cls_attn",), identity={"keep_rate": 1.0}, info_fields=INFO_FIELDS)
def apply_topk(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
               locations: Optional[Sequence[int]] = None) -> nn.Module:
    """Top-k class-attention pruning (EViT without fusion) at [3, 6, 9]: keep ceil(rho*T), drop the rest."""
    model.reducer = TopKReducer(len(model.blocks), keep_rate, locations)
    return model


@register_method("random", params=("keep_rate", "locations", "seed"), families=("vit",), recipe=RECIPE,
                 identity={"keep_rate": 1.0}, info_fields=INFO_FIELDS)
def apply_random(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> nn.Module:
    """Random pruning baseline: keep ceil(rho*T) uniformly random tokens per image at each location.

    Args:
        seed: None draws from torch's global generator; an int gives a private generator (reproducible runs).
    """
    model.reducer = RandomReducer(len(model.blocks), keep_rate, locations, seed)
    return model
