"""Counting multiply-accumulates (GMACs, what the papers call FLOPs) of the inference path actually executed.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls and convolutions (2 FLOPs per MAC) but sees fused
CPU attention as 0 FLOPs, so counting runs under the math SDPA backend, which decomposes attention into
counted matmuls. Token counts are whatever the model really computes on, so reducers' savings (and their own
predictor / matching overhead, where it is matmul work) are included.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def _input_for(model: nn.Module, batch_size: int, img_size: Optional[int]) -> torch.Tensor:
    size = img_size or getattr(model, "img_size", 224)
    chans = getattr(model, "in_chans", 3)
    param = next(model.parameters())
    return torch.randn(batch_size, chans, size, size, device=param.device, dtype=param.dtype)


@torch.no_grad()
def count_flops(model: nn.Module, x: Optional[torch.Tensor] = None, img_size: Optional[int] = None,
                by_module: bool = False):
    """FLOPs (2 x MACs) per image of one eval-mode forward; with by_module, also a {module name: FLOPs} dict."""
    was_training = model.training
    model.eval()
    x = _input_for(model, 1, img_size) if x is None else x
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops() / x.shape[0]
    if not by_module:
        return total
    per = {name: sum(c.values()) / x.shape[0] for name, c in counter.get_flop_counts().items()}
    return total, per


def count_gmacs(model: nn.Module, x: Optional[torch.Tensor] = None, img_size: Optional[int] = None) -> float:
    """GMACs per image (multiply-accumulates / 1e9) of the eval-mode forward."""
    return count_flops(model, x, img_size) / 2e9


def vit_block_macs(num_tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Analytic MACs of one ViT block on T tokens: 4 T C^2 (qkv, proj) + 2 mlp_ratio T C^2 + 2 T^2 C (attention)."""
    T, C = num_tokens, dim
    return (4 + 2 * mlp_ratio) * T * C * C + 2 * T * T * C
