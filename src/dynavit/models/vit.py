"""ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021), with the token-reduction hook.

State-dict keys are timm's, so official DeiT checkpoints load unchanged (docs/methods.md 1.1). The model runs
dense unless a `TokenReducer` is attached (`dynavit.create_model(name, method=...)`), which then acts before
blocks and between attention and MLP (see `dynavit.reduction`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_image_batch
from ..layers import Block, PatchEmbed, init_trunc_normal, patch_grid
from ..reduction import TokenReducer
from ..registry import register_model
from ..tokens import TokenState


class VisionTransformer(nn.Module):
    """Plain ViT with a class token (and optionally DeiT's distillation token).

    Args:
        img_size: input resolution (square). patch_size: patch side. in_chans: image channels.
        num_classes: classifier outputs (0 = no head). embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the
        transformer. norm_eps: LayerNorm epsilon (1e-6 for DeiT). distilled: add DeiT's distillation token
        and second head. residual_scale: residual branch scale (LV-ViT uses 1/2). drop_path_rate: stochastic
        depth (linearly increasing over blocks).
    """

    family = "vit"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, norm_eps: float = 1e-6, distilled: bool = False,
                 residual_scale: float = 1.0, drop_path_rate: float = 0.0, patch_embed: Optional[nn.Module] = None):
        super().__init__()
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_embed = patch_embed or PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps, residual_scale, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        self.distilled_training = False  # timm: return (cls, dist) logits separately while training
        self.reducer: Optional[TokenReducer] = None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            init_trunc_normal(m)

    # ---------------------------------------------------------------- input
    def check_input(self, x: Tensor) -> None:
        """Raise InputError for a tensor this model cannot take (instead of a shape error deep in torch)."""
        check_image_batch(x, self.in_chans, size=self.img_size, fix=" (load_checkpoint resamples pos_embed)")

    def embed(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) -> tokens (B, P+N, C) with position embedding added."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input(x)
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    # ---------------------------------------------------------------- body
    def forward_state(self, x: Tensor, track: bool = False) -> TokenState:
        """Run embedding, blocks (with the reducer's hooks) and the final norm; return the token state."""
        state = TokenState.from_tokens(self.embed(x), self.num_prefix_tokens, track=track)
        reducer = self.reducer
        for i, blk in enumerate(self.blocks):
            if reducer is None:
                state.x = blk(state.x)
                continue
            state = reducer.before_block(self, i, state)
            attn_kwargs = reducer.attention_args(i, state)
            state.x, cls_attn, keys = blk.attn_residual(state.x, **attn_kwargs)
            state = reducer.after_attention(self, i, state, cls_attn, keys)
            state.x = blk.mlp_residual(state.x)
        state.x = self.norm(state.x)
        return state

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-norm tokens (B, P+T, C); T = N for the dense model."""
        return self.forward_state(x).x

    def forward_head(self, tokens: Tensor, valid: Optional[Tensor] = None, per_token: bool = False):
        """Logits from final-norm tokens (B, P+T, C) (timm's name; the one place the head is computed).

        The class token's head (distilled DeiT: the mean of both heads, or the pair while training with
        `distilled_training`). valid: (B, T) False for padding tokens, for heads that read the patch tokens.
        per_token: return (class-token logits, per-token logits (B, T, K) or None for a head without them).
        """
        if per_token:
            return self.forward_head(tokens), None
        if self.head_dist is None:
            return self.head(tokens[:, 0])
        cls_logits, dist_logits = self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])
        if self.training and self.distilled_training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: Tensor, return_info: bool = False):
        """Logits (B, classes); with return_info, (logits, ReductionInfo)."""
        state = self.forward_state(x, track=return_info)
        out = self.forward_head(state.x)
        if self.reducer is not None:
            out = self.reducer.finalize(self, state, out)
        return (out, state.info) if return_info else out

    def extra_repr(self) -> str:
        return f"reducer={self.reducer!r}" if self.reducer is not None else ""


def _vit(defaults: dict, kwargs: dict) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})


@register_model
def vit(**kwargs) -> VisionTransformer:
    """Generic ViT: every architecture argument can be given (defaults: ViT-B/16 at 224)."""
    return _vit({}, kwargs)


_DEIT = {
    "deit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "deit_small_patch16_384": dict(embed_dim=384, depth=12, num_heads=6, img_size=384),
    "deit_base_patch16_384": dict(embed_dim=768, depth=12, num_heads=12, img_size=384),
}


def _register_deit(name: str, arch: dict, distilled: bool) -> None:
    full = name.replace("_patch16", "_distilled_patch16") if distilled else name

    def make(**kwargs) -> VisionTransformer:
        return _vit({**arch, "patch_size": 16, "distilled": distilled}, kwargs)

    make.__name__ = full
    make.__doc__ = f"{full}: DeiT {'(distilled) ' if distilled else ''}{arch}"
    register_model(make)


for _name, _arch in _DEIT.items():
    _register_deit(_name, _arch, distilled=False)
    _register_deit(_name, _arch, distilled=True)


def tiny_vit(**kwargs) -> VisionTransformer:
    """A small ViT for tests and examples (the fixture's geometry: 196 patches, 12 blocks, width 48)."""
    return _vit(dict(embed_dim=48, depth=12, num_heads=3, num_classes=10), kwargs)


register_model(tiny_vit)


class ConvStem(nn.Module):
    """A small convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see
    better"): a k x k stride-k convolution (k = patch / 2^(len(widths) - 1)), then 3x3 stride-2 convolutions
    (BN + ReLU) down to the patch grid, `grid_convs` dilated 3x3 convolutions at the patch grid (each widens the
    receptive field by 4 patches), and a 1x1 projection. (B, 3, H, W) -> (B, N, C), the same N = (H / patch)^2
    as the linear patch embedding.

    The grid convolutions let one token see a whole demo digit (the demo's v3 stem: 46-pixel receptive field at
    112 px, 8% of the model's MACs); with `grid_convs=0` this is the v2 stem (4x4 then stride-2 convolutions).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 64,
                 widths: tuple = (32, 64, 64), grid_convs: int = 0):
        super().__init__()
        first = patch_size // 2 ** (len(widths) - 1)
        if first < 1 or first * 2 ** (len(widths) - 1) != patch_size:
            raise ConfigError(f"ConvStem with {len(widths)} convolutions needs patch_size = k * "
                              f"{2 ** (len(widths) - 1)} (k >= 1), got patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = patch_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        convs, prev = [], in_chans
        for j, w in enumerate(widths):
            conv = nn.Conv2d(prev, w, first, stride=first, bias=False) if j == 0 else \
                nn.Conv2d(prev, w, 3, stride=2, padding=1, bias=False)
            convs += [conv, nn.BatchNorm2d(w), nn.ReLU()]
            prev = w
        for _ in range(grid_convs):  # receptive field +4 patches each, resolution kept
            convs += [nn.Conv2d(prev, prev, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(prev), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.proj = nn.Conv2d(prev, embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2)  # (B, N, C)
