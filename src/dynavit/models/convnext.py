"""ConvNeXt (Liu et al., CVPR 2022), the dense backbone of DynamicCNN (docs/dynamic-hierarchical.md).

State-dict keys are the official ones (facebookresearch/ConvNeXt, also what the DynamicViT authors' `AdaConvNeXt`
saves): `downsample_layers.{0..3}.{0,1}`, `stages.{s}.{j}.{dwconv, norm, pwconv1, pwconv2, gamma}`, `norm`, `head`.
timm's layout (`stem.*`, `stages.{s}.downsample.*`, `stages.{s}.blocks.{j}.{conv_dw, mlp.fc1, ...}`,
`head.norm`, `head.fc`) is converted on load by `checkpoint_filter`.

The classifier is `head(norm(mean over positions))` (the norm after pooling); the teacher's token targets in
DynamicCNN's loss are `norm` applied to every position of the last map instead (`final_featmap`).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import rename_key
from ..errors import ConfigError, check_image_batch
from ..hier import HierarchicalModel, MapContext
from ..layers import DropPath, init_trunc_normal
from ..registry import register_model


def _linspace(end: float, n: int) -> list:
    """Stochastic-depth rates 0 .. end over n blocks (plain floats: also works when building on the meta device)."""
    return [end * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt's `channels_first` LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x))))): the spatial mix (`mix`) then the pointwise FFN (`ffn`).

    DynamicCNN splits the block there: the depthwise conv runs on the whole map, the FFN on the selected positions.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path)

    def mix(self, x: Tensor) -> Tensor:
        """Depthwise conv: (B, C, H, W) -> channels-last (B, H, W, C)."""
        return self.dwconv(x).permute(0, 2, 3, 1)

    def ffn(self, y: Tensor) -> Tensor:
        """The pointwise part on channels-last features (..., C) -> (..., C), layer scale included."""
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return y if self.gamma is None else y * self.gamma

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.ffn(self.mix(x)).permute(0, 3, 1, 2))


_TIMM_RULES = [  # timm ConvNeXt names -> official names
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"stages.\1.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def convert_timm_convnext(sd: dict) -> dict:
    """timm ConvNeXt keys -> the official ones (the inverse of timm's `checkpoint_filter_fn`)."""
    out = {}
    for key, value in sd.items():
        key = rename_key(key, _TIMM_RULES)
        if re.search(r"\.pwconv\d\.weight$", key) and value.ndim == 4:  # timm's conv_mlp: 1x1 convs
            value = value.flatten(1)
        out[key] = value
    return out


class ConvNeXt(HierarchicalModel):
    """ConvNeXt classifier: stem 4x4/4, four stages of ConvNeXt blocks with 2x2/2 downsampling between them.

    Args:
        img_size: nominal input size (GMACs, the stage-3 grid); any size >= 32 runs.
        in_chans, num_classes: image channels and classifier outputs (0 = no head).
        depths, dims: blocks and widths of the four stages (ConvNeXt-T: (3, 3, 9, 3), (96, 192, 384, 768)).
        drop_path_rate: stochastic depth, linear over all blocks. layer_scale_init_value: initial gamma (0 = off).
        head_init_scale: scale of the initial classifier weights.
    """

    family = "convnext"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ConfigError(f"ConvNeXt needs four stages: depths and dims with 4 positive entries each, got "
                              f"depths={list(depths)}, dims={list(dims)}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.grid_size = (img_size // 16, img_size // 16)  # the stage-3 map, where DynamicCNN acts
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
            + [nn.Sequential(LayerNorm2d(dims[s], eps=1e-6), nn.Conv2d(dims[s], dims[s + 1], kernel_size=2, stride=2))
               for s in range(3)])
        dpr = _linspace(drop_path_rate, sum(depths))
        starts = [sum(depths[:s]) for s in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(dims[s], dpr[starts[s] + j], layer_scale_init_value)
                            for j in range(depths[s])]) for s in range(4))
        self.num_features = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.reducer = None
        self.apply(partial(init_trunc_normal, convs=True))
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def checkpoint_filter(self, sd: dict) -> dict:
        """Convert timm's key layout to the official one (used by `load_checkpoint`)."""
        if any(k.startswith(("stem.", "head.fc.", "head.norm.")) or ".blocks." in k for k in sd):
            return convert_timm_convnext(sd)
        return sd

    def check_input(self, x: Tensor) -> None:
        check_image_batch(x, self.in_chans, min_size=32, model="ConvNeXt")

    def stage_blocks(self, s: int) -> nn.Module:
        return self.stages[s]

    def run_stage(self, s: int, x: Tensor) -> Tensor:
        """Stage s's blocks on its (B, C_s, H_s, W_s) map."""
        return self.stages[s](x)

    def forward_features(self, x: Tensor, ctx: Optional[MapContext] = None) -> Tensor:
        """Image -> last map before the norm (B, C_3, H / 32, W / 32); the reducer (if any) runs its stage."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input(x)
        ctx = MapContext() if ctx is None else ctx
        reducer = self.reducer
        for s in range(4):
            x = self.downsample_layers[s](x)
            x = reducer.run_stage(self, s, x, ctx) if reducer is not None and s == reducer.stage else \
                self.run_stage(s, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) map -> head(norm(mean over positions))."""
        pooled = self.norm(x.mean(dim=(2, 3)))  # (B, C)
        return pooled if pre_logits else self.head(pooled)

    def final_featmap(self, x: Tensor) -> Tensor:
        """(B, C, h, w) map -> per-position final norm, channels-last (B, h, w, C) (DynamicCNN's token targets)."""
        return self.norm(x.permute(0, 2, 3, 1))


CONVNEXT_ARCHS = {
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
}


@register_model
def convnext(**kwargs) -> ConvNeXt:
    """Generic ConvNeXt: every architecture argument can be given (defaults: ConvNeXt-T)."""
    return ConvNeXt(**kwargs)


def _register(name: str, arch: dict) -> None:
    def make(**kwargs) -> ConvNeXt:
        return ConvNeXt(**{**arch, **kwargs})

    make.__name__ = name
    make.__doc__ = f"{name}: ConvNeXt {arch}"
    register_model(make)


for _name, _arch in CONVNEXT_ARCHS.items():
    _register(_name, _arch)
