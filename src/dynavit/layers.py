"""Transformer layers shared by every ViT-style backbone: patch embedding, MLP, attention, block.

Attention runs fused (`scaled_dot_product_attention`; short CPU sequences explicitly, see `fused_is_slower`).
Token-reduction methods get what they need from it without giving that up (docs/methods.md section 2): the
class-token row of the attention (`need_cls_attn`, O(N C)), the head-averaged keys (`need_keys`), an additive
bias (`attn_bias`, e.g. a log-size or a padding mask), or an attention of their own
(`attend(q, k, v, scale) -> out`, e.g. DynamicViT's masked softmax while training). Which of these a block
gets is decided per block by the method's `attention_args`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import class_attention


def patch_grid(img_size: int, patch_size: int) -> tuple:
    """(H/p, W/p) for a square image; a size that is not a multiple of the patch is refused (a silent floor
    would drop the image's last pixels: 200 px with 16-pixel patches is a 12 x 12 grid of 192 px)."""
    from .errors import ConfigError

    if int(img_size) < int(patch_size) or int(img_size) % int(patch_size):
        lo = max(int(img_size) // int(patch_size), 1) * int(patch_size)
        raise ConfigError(f"img_size {img_size} is not a multiple of patch_size {patch_size} (the patch grid would "
                          f"cover only {int(img_size) // int(patch_size) * int(patch_size)} px); use "
                          f"{lo}" + (f" or {lo + int(patch_size)}" if lo < int(img_size) else ""))
    return (int(img_size) // int(patch_size),) * 2


def init_trunc_normal(m: nn.Module, convs: bool = False) -> None:
    """timm's ViT init of one module: Linear (and, with `convs`, Conv2d) weights ~ N(0, 0.02) truncated, biases 0;
    LayerNorm weight 1, bias 0. Apply it in the model's own traversal order (`model.apply` or `model.modules()`):
    the order decides which random numbers each weight draws."""
    if isinstance(m, nn.Linear) or (convs and isinstance(m, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, N, C) by a strided convolution (ViT / DeiT)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = patch_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


# On CPU the fused kernel's fixed per-call and per-tile costs outweigh what it saves on short sequences, so a block
# with at most EXPLICIT_MAX_TOKENS tokens computes softmax(q k^T) v explicitly when batch x heads is at least
# EXPLICIT_MIN_BATCH_HEADS (2 threads, explicit / fused time: batch 128, 2 heads of 32: 0.92 at 98 tokens, 0.77 at
# 69, 0.69 at 51, 0.40 at 28; batch 32, 6 heads of 64: 0.89 / 0.77 / 0.71 / 0.59; but 2.4x and 1.07x slower at
# 197; at batch 1 with 2 heads 1.1-2.0x slower). Float32 only; docs/methods.md section 2.
EXPLICIT_MAX_TOKENS = 100
EXPLICIT_MIN_BATCH_HEADS = 6


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T scale + mask) v for q (B, H, T, d), k, v (B, H, M, d): the value of
    `scaled_dot_product_attention` (mask: additive float, or bool with True = attend), computed as two matmuls."""
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, M)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn + mask
    return attn.softmax(dim=-1) @ v


def fused_is_slower(q: Tensor, num_keys: int) -> bool:
    """Whether `explicit_attention` beats the fused kernel for q (B, H, T, d) against num_keys keys (see above)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[2] <= EXPLICIT_MAX_TOKENS
            and num_keys <= EXPLICIT_MAX_TOKENS and q.shape[0] * q.shape[1] >= EXPLICIT_MIN_BATCH_HEADS)


class Attention(nn.Module):
    """Multi-head self-attention, fused (explicit for short sequences on CPU), with the extras token-reduction
    methods need.

    forward(x (B, T, C)) -> (out (B, T, C), cls_attn (B, T) or None, keys (B, T, d) or None)
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None, need_cls_attn: bool = False,
                need_keys: bool = False, attend: Optional[Callable[..., Tensor]] = None):
        """attend: a method's attention `(q, k, v (B, H, T, d), scale) -> (B, H, T, d)` in place of the fused one
        (attn_bias then goes only into the class row); the class row and the keys are always the plain ones."""
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, d)
        if attend is not None:
            out = attend(q, k, v, self.scale)
        else:
            mask = attn_bias.to(q.dtype) if attn_bias is not None else None
            if fused_is_slower(q, T):
                out = explicit_attention(q, k, v, self.scale, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        cls_attn = class_attention(q[:, :, :1], k, self.scale, attn_bias) if need_cls_attn else None
        keys = head_mean(k) if need_keys else None
        out = self.proj(out.transpose(1, 2).reshape(B, T, C))
        return out, cls_attn, keys


def head_mean(k: Tensor) -> Tensor:
    """k (B, H, T, d) -> (B, T, d), the mean over heads (ToMe's and BAT's head-averaged keys), added head by head:
    k.mean(dim=1)'s value (up to 4 heads its sum runs in the same order; tested) at a fraction of its cost on a
    strided view."""
    H = k.shape[1]
    if H < 2 or H > 4:
        return k.mean(dim=1)
    total = k[:, 0] + k[:, 1]
    for h in range(2, H):
        total += k[:, h]
    return total.div_(H)


class Block(nn.Module):
    """Pre-norm transformer block. `residual_scale` is 1 for ViT and 1/2 for LV-ViT (its skip_lam = 2).

    The two residual halves are separate methods: token-reduction methods act between them.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, residual_scale: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.residual_scale = residual_scale
        self.drop_path = DropPath(drop_path)

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        branch = self.drop_path(branch)
        if self.residual_scale != 1.0:
            branch = branch * self.residual_scale
        return x + branch

    def attn_residual(self, x: Tensor, **attn_kwargs):
        """x + attn(norm1(x)); returns (x, cls_attn, keys)."""
        out, cls_attn, keys = self.attn(self.norm1(x), **attn_kwargs)
        return self._residual(x, out), cls_attn, keys

    def mlp_residual(self, x: Tensor) -> Tensor:
        return self._residual(x, self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_residual(self.attn_residual(x)[0])
