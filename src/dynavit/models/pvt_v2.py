"""PVTv2 (Wang et al. 2022): a four-scale transformer with overlapping patch embeddings, spatial-reduction
attention and a depth-wise conv in the MLP (docs/methods.md 7). The dense twin of DiT (`dynavit.models.dit`).

State-dict keys are timm's: `patch_embed.{proj,norm}`, `stages.{s}.downsample.{proj,norm}`,
`stages.{s}.blocks.{j}.{norm1, attn.{q,kv,sr,norm,proj}, norm2, mlp.{fc1,dwconv,fc2}}`, `stages.{s}.norm`, `head`.
Two other released layouts are converted on load (`convert_pvt_v2_state_dict`): the authors' (whai362/PVT,
`patch_embed{1..4}`, `block{1..4}.{j}`, `norm{1..4}`, `mlp.dwconv.dwconv`) and Hugging Face transformers'
(`pvt_v2.encoder.layers.{s}.{patch_embedding, blocks.{j}, layer_norm}`, separate `key` / `value`, `classifier`).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key
from ..errors import CheckpointError, ConfigError, check_image_batch
from ..layers import DropPath, explicit_attention, init_trunc_normal
from ..registry import register_model

Size = tuple  # (H, W) of a token map


class TokenScores(NamedTuple):
    """Training output of a PVTv2 with a token head: class logits (B, K) and per-token scores (B, N_s, K)."""

    logits: Tensor
    token_scores: Tensor


def to_map(x: Tensor, size: Size) -> Tensor:
    """Tokens (B, N, C) -> map (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])


def to_tokens(x: Tensor) -> Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """conv k x k, stride s, padding k // 2, then LayerNorm: (B, C_in, H, W) -> tokens (B, N, C), (H', W')."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 as in the authors' code

    def forward(self, x: Tensor):
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(to_tokens(x)), size


# On CPU, short attentions run faster as softmax(q k^T) v than through the fused kernel, whose per-tile overhead
# dominates (batch 128, 2 threads: 0.39x of its time at 49 queries x 16 keys with head width 8, 0.76x at 16 x 16,
# 0.90x at 121 x 9 with width 16; 1.13-1.42x slower from 196 queries on; docs/dit.md section 8)
EXPLICIT_MAX_QUERIES = 128
EXPLICIT_MAX_KEYS = 64


class SRAttention(nn.Module):
    """Spatial-reduction attention: queries from tokens, keys / values from conv(k=R, s=R)+LN of the whole map.

    forward(x (B, N, C) normed full map, size, query (B, k, C) or None = x, kv_mask (B, M) bool or None)
    -> (B, k, C). Keys and values always come from the full map, so any subset of queries is computed exactly
    (DiT); kv_mask drops keys (DiT: reduced cells that no token has reached).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.sr_ratio = num_heads, dim // num_heads, sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr, self.norm = None, None

    def keys_values(self, x: Tensor, size: Size):
        """Full map (B, N, C) -> k, v each (B, H, M, d) with M = N / R^2."""
        if self.sr is not None:
            x = self.norm(to_tokens(self.sr(to_map(x, size))))  # (B, M, C)
        B, M, C = x.shape
        kv = self.kv(x).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv.unbind(0)

    def forward(self, x: Tensor, size: Size, query: Optional[Tensor] = None,
                kv_mask: Optional[Tensor] = None) -> Tensor:
        query = x if query is None else query
        B, K, C = query.shape
        q = self.q(query).reshape(B, K, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, K, d)
        k, v = self.keys_values(x, size)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]  # (B, 1, 1, M)
        if q.device.type == "cpu" and K <= EXPLICIT_MAX_QUERIES and k.shape[2] <= EXPLICIT_MAX_KEYS:
            out = explicit_attention(q, k, v, self.head_dim ** -0.5, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, K, d)
        return self.proj(out.transpose(1, 2).reshape(B, K, C))


class DWConvMlp(nn.Module):
    """fc1 -> depth-wise conv 3x3 over the token map -> GELU -> fc2 (PVTv2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        h = self.fc1(x)
        h = to_tokens(self.dwconv(to_map(h, size)))
        return self.fc2(self.act(h))


class PvtBlock(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)), LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SRAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, size: Size) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class PvtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 qkv_bias: bool, drop_path: Sequence[float], first: bool):
        super().__init__()
        self.downsample = None if first else OverlapPatchEmbed(3, 2, in_dim, dim)
        self.blocks = nn.ModuleList(PvtBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop_path[j])
                                    for j in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class PyramidVisionTransformerV2(nn.Module):
    """PVTv2 classifier / four-scale backbone.

    Args:
        img_size: nominal input size (used for GMACs and the input check; any multiple of 32 works).
        in_chans, num_classes: image channels and classifier outputs (0 = no head).
        depths, embed_dims, num_heads, mlp_ratios, sr_ratios: per-scale architecture (4 entries each).
        qkv_bias: bias of q / kv. drop_path_rate: stochastic depth, linear over all blocks.
        global_pool: 'avg' (PVTv2) or 'max' over the last map before the head ('max' learns a small object in
            clutter much sooner: the demo's DiT uses it, docs/demo.md).
        token_head_scale: None (PVTv2), or a scale s in 0..3: adds `aux_head`, a Linear on the tokens of map s,
            used in training only: the training forward returns `TokenScores(logits, token_scores)` for token
            labelling from a teacher (`dynavit train --token-teacher`, docs/demo.md); inference is PVTv2's head.
    """

    family = "pvt_v2"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 4, 6, 3), embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", token_head_scale: Optional[int] = None):
        super().__init__()
        if global_pool not in ("avg", "max"):
            raise ConfigError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        if token_head_scale is not None and token_head_scale not in (0, 1, 2, 3):
            raise ConfigError(f"token_head_scale must be None or a scale 0..3 (stride 4, 8, 16, 32), got "
                              f"{token_head_scale!r}")
        self.token_head_scale = token_head_scale
        self.global_pool = global_pool
        for name, v in dict(depths=depths, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                            sr_ratios=sr_ratios).items():
            if len(v) != 4:
                raise ConfigError(f"{name} needs one entry per scale (4), got {list(v)}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.depths, self.embed_dims = tuple(depths), tuple(embed_dims)
        self.mlp_ratios, self.sr_ratios = tuple(mlp_ratios), tuple(sr_ratios)
        self.patch_embed = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))  # meta-safe
        self.stages = nn.ModuleList(
            PvtStage(embed_dims[max(s - 1, 0)], embed_dims[s], depths[s], num_heads[s], mlp_ratios[s], sr_ratios[s],
                     qkv_bias, dpr[s].tolist(), first=s == 0) for s in range(4))
        self.num_features = embed_dims[-1]
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if token_head_scale is not None:
            if num_classes <= 0:
                raise ConfigError("token_head_scale needs a classifier (num_classes > 0)")
            self.aux_head = nn.Linear(embed_dims[token_head_scale], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """timm's Linear / LayerNorm init; convolutions N(0, sqrt(2 / fan_out)) as the official code."""
        init_trunc_normal(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def check_input(self, x: Tensor) -> None:
        check_image_batch(x, self.in_chans, min_size=32, model="PVTv2")

    def embed(self, x: Tensor, s: int, prev: Optional[Tensor], prev_size: Optional[Size]):
        """Entry of scale s: the stem on the image (s = 0) or the stride-2 downsample of the previous map."""
        if s == 0:
            if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
                self.check_input(x)
            return self.patch_embed(x)
        return self.stages[s].downsample(to_map(prev, prev_size))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Four maps after each scale's norm: (B, C_s, H / 2^(s+2), W / 2^(s+2)) for s = 0..3 (ceil)."""
        maps, tokens, size = [], None, None
        for s, stage in enumerate(self.stages):
            tokens, size = self.embed(x, s, tokens, size)
            for blk in stage.blocks:
                tokens = blk(tokens, size)
            tokens = stage.norm(tokens)
            maps.append(to_map(tokens, size))
        return maps

    def forward_head(self, last_map: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = last_map.mean(dim=(2, 3)) if self.global_pool == "avg" else last_map.amax(dim=(2, 3))  # (B, C3)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor):
        maps = self.forward_features(x)
        logits = self.forward_head(maps[-1])
        if self.training and self.token_head_scale is not None:
            return TokenScores(logits, self.aux_head(to_tokens(maps[self.token_head_scale])))  # (B, N_s, K)
        return logits

    def checkpoint_filter(self, sd: dict) -> dict:
        """Called by `dynavit.checkpoint.filter_state_dict`: authors' / transformers' keys -> ours (timm's)."""
        return convert_pvt_v2_state_dict(sd)


# ---------------------------------------------------------------- other checkpoint layouts
def pvt_v2_layout(sd) -> str:
    """'official' (whai362/PVT), 'hf' (transformers' PvtV2ForImageClassification / PvtV2Model) or 'timm'."""
    if any(k.startswith(("pvt_v2.encoder.", "encoder.layers.")) for k in sd):
        return "hf"
    if any(re.match(r"^(patch_embed[1-4]|block[1-4])\.", k) for k in sd):
        return "official"
    return "timm"


_OFFICIAL_RULES = [  # whai362/PVT classification/pvt_v2.py -> timm (the same renaming as timm's filter)
    (r"^patch_embed1\.", "patch_embed."),
    (r"^patch_embed([2-4])\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
    (r"^block([1-4])\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm([1-4])\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
]

_HF_RULES = [  # transformers models/pvt_v2/modeling_pvt_v2.py -> timm (key / value handled separately)
    (r"^encoder\.layers\.0\.patch_embedding\.layer_norm\.", "patch_embed.norm."),
    (r"^encoder\.layers\.0\.patch_embedding\.", "patch_embed."),
    (r"^encoder\.layers\.(\d+)\.patch_embedding\.layer_norm\.", r"stages.\1.downsample.norm."),
    (r"^encoder\.layers\.(\d+)\.patch_embedding\.", r"stages.\1.downsample."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"stages.\1.norm."),
    (r"^encoder\.layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.query\.", ".attn.q."),
    (r"\.attention\.spatial_reduction\.", ".attn.sr."),
    (r"\.attention\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.proj\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^classifier\.", "head."),
]
_HF_KV = re.compile(r"^(.*)\.attention\.(key|value)\.(weight|bias)$")


def convert_pvt_v2_state_dict(sd: dict) -> dict:
    """Any released PVTv2 layout -> ours (timm's). transformers' `key` and `value` are stacked into `kv`
    (rows k then v, the order `SRAttention.keys_values` splits them in); other layouts are renamed only."""
    layout = pvt_v2_layout(sd)
    if layout == "official":
        return {rename_key(k, _OFFICIAL_RULES, first_only=False): v for k, v in sd.items()}
    if layout == "timm":
        return dict(sd)
    out, kv = {}, {}
    for key, value in sd.items():
        k = re.sub(r"^pvt_v2\.", "", key)
        m = _HF_KV.match(k)
        if m:
            kv.setdefault((rename_key(m.group(1), _HF_RULES, first_only=False), m.group(3)), {})[m.group(2)] = value
            continue
        out[rename_key(k, _HF_RULES, first_only=False)] = value
    for (prefix, kind), parts in kv.items():
        if set(parts) != {"key", "value"}:
            raise CheckpointError(f"transformers PVTv2 checkpoint: {prefix} has {sorted(parts)} {kind}, "
                                  f"needs both key and value")
        out[f"{prefix}.attn.kv.{kind}"] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


# variant table (docs/methods.md 7): depths, widths, MLP ratios; heads 1, 2, 5, 8 and SR ratios 8, 4, 2, 1 throughout
PVT_V2_ARCHS = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4)),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "b5": dict(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4)),
    # for tests and demos: 8 blocks, head dim 8; 5.7 MMACs at 64 px, 0.085 GMACs at 224
    "tiny": dict(depths=(2, 2, 2, 2), embed_dims=(16, 32, 40, 64), mlp_ratios=(4, 4, 4, 4), num_classes=10),
}


def register_family(prefix: str, cls: type) -> None:
    """Register `{prefix}_b0` .. `{prefix}_b5` and `{prefix}_tiny` building `cls` with the table above."""
    for variant, arch in PVT_V2_ARCHS.items():
        def make(_arch=arch, **kwargs):
            return cls(**{**_arch, **kwargs})

        make.__name__ = f"{prefix}_{variant}"
        make.__doc__ = f"{prefix}_{variant}: {cls.__name__} {arch}"
        register_model(make)


register_family("pvt_v2", PyramidVisionTransformerV2)
