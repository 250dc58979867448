"""Swin Transformer (Liu et al., ICCV 2021), the dense backbone of DynamicSwin (docs/dynamic-hierarchical.md).

State-dict keys are the official ones (microsoft/Swin-Transformer, also the DynamicViT authors' `AdaSwinTransformer`):
`patch_embed.{proj, norm}`, `layers.{i}.blocks.{j}.{norm1, attn.{qkv, proj, relative_position_bias_table}, norm2,
mlp.{fc1, fc2}}`, `layers.{i}.downsample.{norm, reduction}` (patch merging at the *end* of stage i), `norm`, `head`.
The relative-position index and the shifted-window masks are computed, not learned: they are non-persistent
buffers here, and the copies official checkpoints carry (`attn.relative_position_index`, `attn_mask`) are dropped
on load. timm's layout (patch merging at the start of stage i + 1, `head.fc`) is converted by `checkpoint_filter`.

Window attention runs fused (`scaled_dot_product_attention`) with the relative-position bias (and the shift mask,
-100 between regions as in the official code) as its additive mask.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_image_batch
from ..hier import HierarchicalModel, MapContext
from ..layers import DropPath, Mlp, init_trunc_normal
from ..registry import register_model


def window_partition(x: Tensor, w: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, w * w, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: Tensor, w: int, H: int, W: int) -> Tensor:
    """(B * nW, w * w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(w: int) -> Tensor:
    """(w*w, w*w) index into the (2w-1)^2 relative-position table (the official layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (w*w, w*w, 2), from 0
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shift_mask(H: int, W: int, w: int, shift: int) -> Tensor:
    """(nW, w*w, w*w) additive mask of shifted windows: 0 within a region, -100 across regions (official values)."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    regions = window_partition(img, w).squeeze(-1)  # (nW, w*w)
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def _linspace(end: float, n: int) -> list:
    """Stochastic-depth rates 0 .. end over n blocks (plain floats: also works when building on the meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(f"Swin width {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """(heads, w*w, w*w) relative-position bias."""
        L = self.window_size ** 2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(L, L, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x (B * nW, L, C) windows, mask (nW, L, L) or None -> (B * nW, L, C)."""
        Bw, L, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(Bw, L, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # (Bw, h, L, d)
        bias = self.position_bias().unsqueeze(0).to(q.dtype)  # (1, h, L, L)
        if mask is not None:  # windows of one image share the mask: (B, nW * h, L, d) against (1, nW * h, L, L)
            nW = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(q.dtype)).reshape(1, nW * h, L, L)
            q, k, v = (t.reshape(Bw // nW, nW * h, L, C // h) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.reshape(Bw, h, L, C // h).transpose(1, 2).reshape(Bw, L, C))


class SwinBlock(nn.Module):
    """x = x + attn(norm1(x)) in (shifted) windows; x = x + mlp(norm2(x)). Tokens (B, H*W, C), row-major."""

    def __init__(self, dim: int, resolution: tuple, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.dim, self.resolution = dim, tuple(resolution)
        if min(resolution) <= window_size:  # the official rule: one window covers the map, no shift
            window_size, shift_size = min(resolution), 0
        if resolution[0] % window_size or resolution[1] % window_size:
            raise ConfigError(f"Swin stage map {resolution[0]}x{resolution[1]} is not divisible into windows of "
                              f"{window_size}; choose img_size so that every stage map is a multiple of window_size")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(*self.resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def attn_residual(self, x: Tensor) -> Tensor:
        """x + drop_path(window attention of norm1(x)): (B, H*W, C) -> (B, H*W, C)."""
        H, W = self.resolution
        B, N, C = x.shape
        y = self.norm1(x).view(B, H, W, C)
        s, w = self.shift_size, self.window_size
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, w), self.attn_mask), w, H, W)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        return x + self.drop_path(y.reshape(B, N, C))

    def ffn(self, x: Tensor) -> Tensor:
        """The MLP branch mlp(norm2(x)) on any (..., C) tokens (DynamicSwin's full path)."""
        return self.mlp(self.norm2(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_residual(x)
        return x + self.drop_path(self.ffn(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int, resolution: tuple):
        super().__init__()
        self.resolution = tuple(resolution)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.resolution
        B, _, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, (H // 2) * (W // 2), 4 * C)
        return self.reduction(self.norm(x))


class SwinPatchEmbed(nn.Module):
    """p x p / p convolution, then LayerNorm (patch_norm): (B, 3, H, W) -> (B, N, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinStage(nn.Module):
    """`blocks` then (except the last stage) `downsample`, the official layout."""

    def __init__(self, dim: int, resolution: tuple, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float], downsample: bool):
        super().__init__()
        self.dim, self.resolution = dim, tuple(resolution)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio,
                      qkv_bias, drop_path[j]) for j in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None


_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def convert_timm_swin(sd: dict) -> dict:
    """timm Swin keys -> the official ones: patch merging moves back to the end of the previous stage,
    `head.fc` -> `head`."""
    out = {}
    for key, value in sd.items():
        m = _TIMM_DOWNSAMPLE.match(key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample." + key[m.end():]
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out


class SwinTransformer(HierarchicalModel):
    """Swin Transformer classifier (v1).

    Args:
        img_size: input size (fixed: the shifted-window masks are built for it; every stage map must divide
            into windows). patch_size, in_chans, num_classes (0 = no head).
        embed_dim, depths, num_heads: width of stage 0 (doubling per stage), blocks and heads per stage.
        window_size, mlp_ratio, qkv_bias: as the official code. drop_path_rate: stochastic depth, linear.
        ape: absolute position embedding (`absolute_pos_embed`). patch_norm: LayerNorm after the patch embedding.
    """

    family = "swin"

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 ape: bool = False, patch_norm: bool = True):
        super().__init__()
        if len(depths) != len(num_heads) or len(depths) < 3 or min(depths) < 1:
            raise ConfigError(f"Swin needs at least three stages with one depth and one head count each, got "
                              f"depths={list(depths)}, num_heads={list(num_heads)}")
        grid = img_size // patch_size
        if grid % 2 ** (len(depths) - 1):
            step = patch_size * 2 ** (len(depths) - 1)
            raise ConfigError(f"img_size {img_size} / patch_size {patch_size} = {grid} patches per side cannot be "
                              f"halved {len(depths) - 1} times; use a multiple of {step}")
        self.img_size, self.patch_size, self.in_chans, self.num_classes = img_size, patch_size, in_chans, num_classes
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        self.window_size = window_size
        self.patch_embed = SwinPatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim)) if ape else None
        if ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        dpr = _linspace(drop_path_rate, sum(depths))
        S = len(depths)
        self.resolutions = [(grid // 2 ** i, grid // 2 ** i) for i in range(S)]
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** i, self.resolutions[i], depths[i], num_heads[i], window_size, mlp_ratio,
                      qkv_bias, dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < S - 1) for i in range(S))
        self.grid_size = self.resolutions[2]  # the stage-3 map, where DynamicSwin acts
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_features = embed_dim * 2 ** (S - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reducer = None
        self.apply(init_trunc_normal)

    def checkpoint_filter(self, sd: dict) -> dict:
        """Drop the computed buffers official checkpoints carry; convert timm's layout (used by load_checkpoint)."""
        sd = {k: v for k, v in sd.items() if not k.endswith(("attn.relative_position_index", ".attn_mask"))}
        timm = "head.fc.weight" in sd or ("layers.0.downsample.reduction.weight" not in sd
                                           and "layers.1.downsample.reduction.weight" in sd)
        return convert_timm_swin(sd) if timm else sd

    def check_input(self, x: Tensor) -> None:
        check_image_batch(x, self.in_chans, size=self.img_size, model="this Swin model",
                          why=" (its window masks are built for that size)")

    def embed(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) -> patch tokens (B, N, C)."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input(x)
        x = self.patch_embed(x)
        return x if self.absolute_pos_embed is None else x + self.absolute_pos_embed

    def stage_blocks(self, s: int) -> nn.ModuleList:
        return self.layers[s].blocks

    def run_stage(self, s: int, x: Tensor) -> Tensor:
        """Stage s's blocks on its (B, H_s * W_s, C_s) tokens (patch merging not included)."""
        for blk in self.layers[s].blocks:
            x = blk(x)
        return x

    def forward_features(self, x: Tensor, ctx: Optional[MapContext] = None) -> Tensor:
        """Image -> last-stage tokens before the final norm (B, N / 4^(S-1), C_last)."""
        x = self.embed(x)
        ctx = MapContext() if ctx is None else ctx
        reducer = self.reducer
        for s, layer in enumerate(self.layers):
            x = reducer.run_stage(self, s, x, ctx) if reducer is not None and s == reducer.stage else \
                self.run_stage(s, x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L, C) last tokens -> head(mean over tokens of norm(x))."""
        pooled = self.norm(x).mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def final_featmap(self, x: Tensor) -> Tensor:
        """(B, L, C) -> norm(x) (B, L, C): DynamicSwin's token targets."""
        return self.norm(x)


SWIN_ARCHS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


@register_model
def swin(**kwargs) -> SwinTransformer:
    """Generic Swin Transformer: every architecture argument can be given (defaults: Swin-T)."""
    return SwinTransformer(**kwargs)


def _register(name: str, arch: dict) -> None:
    def make(**kwargs) -> SwinTransformer:
        return SwinTransformer(**{**arch, "patch_size": 4, "window_size": 7, **kwargs})

    make.__name__ = name
    make.__doc__ = f"{name}: Swin {arch}"
    register_model(make)


for _name, _arch in SWIN_ARCHS.items():
    _register(_name, _arch)
