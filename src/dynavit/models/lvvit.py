"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling", NeurIPS 2021), as DynamicViT and BAT report on it.

Differences from DeiT (docs/methods.md 1.2): a 3-conv stem before the patch projection, no qkv bias, LayerNorm eps
1e-5, residual branches divided by 2, and an `aux_head` on every patch token whose max over tokens is added
(x 0.5) to the class-token logits. Keys match the released LV-ViT checkpoints.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..layers import patch_grid
from ..registry import register_model
from .vit import ConvStem, VisionTransformer


class ConvStemEmbed(nn.Module):
    """conv7x7 s2 -> BN -> ReLU -> (conv3x3 -> BN -> ReLU) x 2 -> conv k=p/2 s=p/2: (B, 3, H, W) -> (B, N, C)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_dim: int = 64):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = patch_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(stem_dim, embed_dim, patch_size // 2, stride=patch_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class LVViT(VisionTransformer):
    """LV-ViT: a VisionTransformer with the conv stem, halved residuals and the token-labeling aux head."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 qkv_bias: bool = False, norm_eps: float = 1e-5, residual_scale: float = 0.5,
                 drop_path_rate: float = 0.0, aux_weight: float = 0.5, stem: Optional[nn.Module] = None,
                 train_cls_head: bool = False):
        stem = stem or ConvStemEmbed(img_size, patch_size, in_chans, embed_dim)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, norm_eps=norm_eps, residual_scale=residual_scale,
                         drop_path_rate=drop_path_rate, patch_embed=stem)
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_weight = aux_weight
        # dense training: also return the class head alone, so the loss trains it (see forward_head)
        self.train_cls_head = train_cls_head
        if num_classes > 0:
            nn.init.trunc_normal_(self.aux_head.weight, std=0.02)
            nn.init.zeros_(self.aux_head.bias)

    def forward_head(self, tokens: Tensor, valid: Optional[Tensor] = None, per_token: bool = False):
        """head(x_cls) + aux_weight * max over the (valid) patch tokens of aux_head(x_patch).

        valid: (B, T) False for padding tokens (never win the max). per_token: (head(x_cls), aux scores (B, T, K)).
        With `train_cls_head`, a dense model in training returns (head(x_cls), that sum): the classification
        criterion averages the two cross-entropies, so the class head is trained for itself, as LV-ViT's
        token-labeling training does (its aux head gets token labels; without them, the max over tokens).
        Without it, a strong aux path (e.g. a CNN-pretrained stem) leaves the class head at chance, and the
        class attention that EViT / BAT read and DynamicViT's class-head loss mean nothing.
        """
        cls_logits = self.head(tokens[:, 0])
        aux_logits = self.aux_head(tokens[:, self.num_prefix_tokens:])  # (B, T, classes)
        if per_token:
            return cls_logits, aux_logits
        if valid is not None:
            aux_logits = aux_logits.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        logits = cls_logits + self.aux_weight * aux_logits.max(dim=1)[0]
        if self.training and self.train_cls_head and self.reducer is None:
            return cls_logits, logits
        return logits


@register_model
def lvvit(**kwargs) -> LVViT:
    """Generic LV-ViT (defaults: LV-ViT-S)."""
    return LVViT(**kwargs)


@register_model
def lvvit_s(**kwargs) -> LVViT:
    """LV-ViT-S: C 384, depth 16, 6 heads, MLP ratio 3 (26.2M params)."""
    return LVViT(**{**dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0), **kwargs})


@register_model
def lvvit_m(**kwargs) -> LVViT:
    """LV-ViT-M: C 512, depth 20, 8 heads, MLP ratio 3."""
    return LVViT(**{**dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0), **kwargs})


# The demo backbone's stem (v3 task): 112 px, 8-pixel patches (196 tokens), one dilated grid convolution
DEMO_STEM = dict(img_size=112, patch_size=8, widths=(16, 32, 64), grid_convs=1)


@register_model
def demo_vit(**kwargs) -> LVViT:
    """The demo backbone, shipped pretrained on the `demo` digits (`dynavit.assets`): the papers' token geometry
    (196 patch tokens, 12 blocks, DeiT blocks with qkv bias) at 112 px with 8-pixel patches, width 64 with 2
    heads, a small convolutional stem (`ConvStem`, `DEMO_STEM`) and LV-ViT's per-token aux head (max over
    tokens, x 0.5); 0.69 M params. Dense training also trains the class head alone (`train_cls_head`)."""
    arch = {**dict(embed_dim=64, depth=12, num_heads=2, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6,
                   residual_scale=1.0, num_classes=10, train_cls_head=True, img_size=DEMO_STEM["img_size"],
                   patch_size=DEMO_STEM["patch_size"]), **kwargs}
    stem = ConvStem(arch["img_size"], arch["patch_size"], arch.get("in_chans", 3), arch["embed_dim"],
                    widths=DEMO_STEM["widths"], grid_convs=DEMO_STEM["grid_convs"])
    return LVViT(**arch, stem=stem)
