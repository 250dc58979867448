"""Counting multiply-accumulates (GMACs, what the papers call FLOPs) of the inference path actually executed.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls and convolutions (2 FLOPs per MAC) but sees fused
CPU attention as 0 FLOPs, so counting runs under the math SDPA backend, which decomposes attention into
counted matmuls. Token counts are whatever the model really computes on, so reducers' savings (and their own
predictor / matching overhead, where it is matmul work) are included.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def _input_for(model: nn.Module, batch_size: int, img_size: Optional[int]) -> torch.Tensor:
    size = img_size or getattr(model, "img_size", 224)
    chans = getattr(model, "in_chans", 3)
    param = next(model.parameters())
    return torch.randn(batch_size, chans, size, size, device=param.device, dtype=param.dtype)


def counted(fn: Callable[[], object]) -> FlopCounterMode:
    """Run `fn()` under FlopCounterMode with math attention (so SDPA's matmuls are counted); the counter."""
    counter = FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter


def count_step_flops(step: Callable[[], object]) -> float:
    """Total FLOPs (2 x MACs) of one call of `step` (e.g. a training step: forward and backward)."""
    return counted(step).get_total_flops()


def _run_counted(model: nn.Module, x: Optional[torch.Tensor], img_size: Optional[int]):
    """One eval-mode forward under `counted`."""
    was_training = model.training
    model.eval()
    x = _input_for(model, 1, img_size) if x is None else x
    try:
        counter = counted(lambda: model(x))
    finally:
        model.train(was_training)
    return counter, x


@torch.no_grad()
def count_flops(model: nn.Module, x: Optional[torch.Tensor] = None, img_size: Optional[int] = None,
                by_module: bool = False):
    """FLOPs (2 x MACs) per image of one eval-mode forward; with by_module, also a {module name: FLOPs} dict."""
    counter, x = _run_counted(model, x, img_size)
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


def _block_tokens(model: nn.Module) -> tuple:
    """Forward pre-hooks recording the tokens entering each block's attention (ViT-style models with `blocks`)."""
    tokens: dict = {}
    hooks = []
    prefix = getattr(model, "num_prefix_tokens", 0)
    for i, blk in enumerate(getattr(model, "blocks", [])):
        attn = getattr(blk, "attn", None)
        if isinstance(attn, nn.Module):
            hooks.append(attn.register_forward_pre_hook(
                lambda mod, args, i=i: tokens.__setitem__(i, args[0].shape[1] - prefix)))
    return tokens, hooks


@torch.no_grad()
def flops_breakdown(model: nn.Module, x: Optional[torch.Tensor] = None, img_size: Optional[int] = None) -> dict:
    """GMACs per image of the executed eval forward: total, per part, per block and per stage.

    parts: the outermost counted modules in execution order (`patch_embed`, `blocks.3`, a predictor
    a method's predictor, `head`, ...), plus `(outside modules)`: matmuls a reducer runs itself (clustering,
    matching, merging). blocks: per block, its GMACs and the non-prefix tokens entering it. stages: runs of
    consecutive blocks with the same token count.
    """
    tokens, hooks = _block_tokens(model)
    try:
        counter, x = _run_counted(model, x, img_size)
    finally:
        for h in hooks:
            h.remove()
    scale = 2e9 * x.shape[0]
    root = type(model).__name__ + "."
    counts = {n[len(root):]: sum(c.values()) for n, c in counter.get_flop_counts().items() if n.startswith(root)}
    outer = [n for n in counts if not any(n.startswith(a + ".") for a in counts if a != n)]
    parts: dict = {}
    blocks: dict = {}
    for name in outer:
        key = name
        fields = name.split(".")
        if len(fields) >= 2 and fields[0] == "blocks" and fields[1].isdigit():
            key = f"blocks.{fields[1]}"
            blocks[int(fields[1])] = blocks.get(int(fields[1]), 0) + counts[name]
        parts[key] = parts.get(key, 0) + counts[name]
    total = counter.get_total_flops()
    outside = total - sum(parts.values())
    out_parts = [{"name": k, "gmacs": v / scale} for k, v in parts.items()]
    if abs(outside) > 0:
        out_parts.append({"name": "(outside modules)", "gmacs": outside / scale})
    out_blocks = [{"index": i, "tokens": tokens.get(i), "gmacs": blocks[i] / scale} for i in sorted(blocks)]
    stages: list = []
    for b in out_blocks:
        if stages and stages[-1]["tokens"] == b["tokens"] and stages[-1]["blocks"][1] == b["index"] - 1:
            stages[-1]["blocks"][1] = b["index"]
            stages[-1]["gmacs"] += b["gmacs"]
        else:
            stages.append({"blocks": [b["index"], b["index"]], "tokens": b["tokens"], "gmacs": b["gmacs"]})
    return {"gmacs": total / scale, "parts": out_parts, "blocks": out_blocks, "stages": stages}
