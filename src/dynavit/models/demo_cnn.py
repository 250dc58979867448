"""The demo backbone's convolutional stem as a classifier of its own, to pretrain the stem (see docs/demo.md).

A ViT trained from scratch on the demo digits stays at chance for tens of thousands of images on a CPU, while
a small CNN leaves chance after a few thousand: the ViT has to learn local stroke features and where to
attend at once. `demo_cnn` is `demo_vit` without its transformer blocks and class token: the convolutional
stem, the final LayerNorm and the LV-ViT-style `aux_head` applied to every patch token, max over tokens. Its
state-dict keys (`patch_embed.*`, `norm.*`, `aux_head.*`) are the ViT's, so
`dynavit train --model demo_vit --init CNN_RUN/model.safetensors` starts a ViT whose token path already
recognises digits (the blocks are residual, so at initialisation the ViT's aux logits are the CNN's).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..registry import register_model
from .lvvit import DEMO_STEM
from .vit import ConvStem


class StemClassifier(nn.Module):
    """ConvStem -> LayerNorm -> Linear per token -> max over tokens: (B, 3, H, W) -> (B, classes)."""

    family = "cnn"

    def __init__(self, img_size: int = DEMO_STEM["img_size"], patch_size: int = DEMO_STEM["patch_size"],
                 in_chans: int = 3, num_classes: int = 10, embed_dim: int = 64):
        super().__init__()
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, widths=DEMO_STEM["widths"],
                                    grid_convs=DEMO_STEM["grid_convs"])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.aux_head = nn.Linear(embed_dim, num_classes)

    def token_scores(self, x: Tensor) -> Tensor:
        """Per-token class scores (B, N, K): the token labels `dynavit train --token-teacher` reads."""
        return self.aux_head(self.norm(self.patch_embed(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.token_scores(x).amax(dim=1)  # (B, N, K) -> (B, K)


@register_model
def demo_cnn(**kwargs) -> StemClassifier:
    """`demo_vit`'s convolutional stem, final norm and per-token aux head, max over tokens (0.06 M params)."""
    return StemClassifier(**kwargs)
