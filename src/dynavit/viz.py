"""Pictures of what a method did to an image: kept / pruned patches, merged groups, a model family's own view.

Everything is drawn from the `ReductionInfo` a forward returns with `return_info=True`, so one function serves
every method: `info.patch_to_token[stage]` says which token holds each original patch (-1 once pruned). Pruned
patches are faded to white, patches that share a token with others (merged groups, a fused token) are tinted
with the group's colour and outlined, and single-patch tokens are left as they are. A model that draws itself
differently (a routed model family) defines `viz_panels(info, b, image) -> [(title, kind, payload), ...]` with
kinds 'image', 'overlay' or 'heatmap'; one that draws a figure of its own defines `save_viz(x, path, labels,
title)` and may build it from `new_figure`, `mask_tile` and `save_figure` (docs/writing-a-method.md).

matplotlib is an optional dependency (`pip install dynavit[plot]`); it is imported when a figure is drawn.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

FADE = 0.78  # how far pruned patches are blended towards white


def to_uint8_image(x: Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor (ImageNet mean / std) back to an (H, W, 3) uint8 array."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def group_colors(num: int, seed: int = 0) -> np.ndarray:
    """`num` well-separated RGB colours in [0, 1] (golden-ratio hues, fixed per seed)."""
    rng = np.random.default_rng(seed)
    start = rng.random()
    return np.array([colorsys.hsv_to_rgb((start + 0.618034 * i) % 1.0, 0.85, 0.95) for i in range(num)])


def token_overlay(image: np.ndarray, patch_to_token: Tensor, grid: tuple, tint: float = 0.55,
                  fade: float = FADE) -> np.ndarray:
    """The image with a method's decision drawn on it (float RGB in [0, 1], same size as `image`).

    image: (H, W, 3) uint8. patch_to_token: (N,) long for one image (N = grid[0] * grid[1]), -1 = pruned.
    Pruned patches fade to white; tokens holding several patches get one colour per token, blended by `tint`,
    with a dark outline where neighbouring patches belong to different groups.
    """
    H, W = image.shape[:2]
    gh, gw = grid
    ph, pw = H // gh, W // gw
    p2t = patch_to_token.detach().cpu().long().view(gh, gw).numpy()
    out = image.astype(np.float32) / 255.0
    ids, counts = np.unique(p2t[p2t >= 0], return_counts=True)
    multi = ids[counts > 1]
    colors = group_colors(len(multi))
    color_of = {int(t): colors[j] for j, t in enumerate(multi)}
    up = np.kron(p2t, np.ones((ph, pw), dtype=p2t.dtype))  # (gh*ph, gw*pw) token id per pixel
    canvas = out[:gh * ph, :gw * pw]
    canvas[up < 0] = canvas[up < 0] * (1 - fade) + fade
    for t, c in color_of.items():
        m = up == t
        canvas[m] = canvas[m] * (1 - tint) + tint * c
    edge = np.zeros_like(up, dtype=bool)  # outline groups: pixel differs from its right / lower neighbour
    grouped = np.isin(up, multi)
    edge[:, :-1] |= (up[:, :-1] != up[:, 1:]) & (grouped[:, :-1] | grouped[:, 1:])
    edge[:-1, :] |= (up[:-1, :] != up[1:, :]) & (grouped[:-1, :] | grouped[1:, :])
    canvas[edge] = canvas[edge] * 0.3
    return out


def draw_heatmap(ax, image: np.ndarray, values: Tensor, vmax: float) -> None:
    """A (gh, gw) map of values (e.g. blocks run per location) over the image."""
    ax.imshow(image)
    H, W = image.shape[:2]
    ax.imshow(values.cpu().numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=vmax, extent=(0, W, H, 0),
              interpolation="nearest")


def describe(patch_to_token: Tensor) -> str:
    """'67 kept' / '67 tokens, 12 merged groups' for a one-image patch map (a panel's caption)."""
    p2t = patch_to_token[patch_to_token >= 0]
    ids, counts = torch.unique(p2t, return_counts=True)
    merged = int((counts > 1).sum())
    return f"{len(ids)} tokens" + (f", {merged} merged" if merged else "")


def stage_panels(info, b: int, image: np.ndarray, grid: tuple) -> list:
    """One overlay panel per reduction stage of image b (what every token-reduction method draws)."""
    return [(f"stage {s + 1}: {describe(p2t[b])}", "overlay", token_overlay(image, p2t[b], grid))
            for s, p2t in enumerate(info.patch_to_token)]


def panels_for(model, x: Tensor, labels: Optional[Sequence[str]] = None,
               class_names: Optional[Sequence[str]] = None) -> list:
    """Run `model` on a batch (B, 3, H, W) and return, per image, a list of (title, kind, payload) panels.

    The last panel names the predicted class (`class_names[i]` when given, else the index)."""
    model.eval()
    with torch.no_grad():
        logits, info = model(x, return_info=True)
    pred = logits.argmax(-1)
    own = getattr(model, "viz_panels", None)
    out = []
    for b in range(x.shape[0]):
        image = to_uint8_image(x[b])
        panels = [(f"input" + (f" ({labels[b]})" if labels else ""), "image", image)]
        if callable(own):
            panels += own(info, b, image)
        elif info.patch_to_token:
            panels += stage_panels(info, b, image, tuple(model.grid_size))
        k = int(pred[b])
        name = class_names[k] if class_names is not None and k < len(class_names) else k
        panels[-1] = (panels[-1][0] + f"\npredicted {name}", *panels[-1][1:])
        out.append(panels)
    return out


def mask_tile(image: np.ndarray, active: Tensor, size: tuple) -> np.ndarray:
    """The image where `active` (N,) tokens of an (h, w) token grid are, white elsewhere (float RGB in [0, 1])."""
    H, W = image.shape[:2]
    m = active.detach().cpu().view(1, 1, *size).float()
    stride_h, stride_w = -(-H // size[0]), -(-W // size[1])
    up = m.repeat_interleave(stride_h, 2).repeat_interleave(stride_w, 3)[0, 0, :H, :W].numpy()[..., None]
    return (image.astype(np.float32) / 255.0) * up + (1.0 - up)


def draw_panel(ax, title: str, kind: str, payload) -> None:
    if kind == "heatmap":
        draw_heatmap(ax, *payload)
    else:
        ax.imshow(payload)
    ax.set_title(title, fontsize=7.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path) -> Path:
    """Labels, grid and legend on `ax`, then save `fig` to `path` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return Path(path)


def new_figure(n_rows: int, n_cols: int, figsize: tuple) -> tuple:
    """(figure, axes[row][col]) of an n_rows x n_cols grid of panels."""
    return _pyplot().subplots(n_rows, n_cols, figsize=figsize, squeeze=False)


def save_figure(fig, path, title: Optional[str] = None, dpi: int = 110) -> Path:
    """Title `fig`, save it to `path` (creating its folder) and close it."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def save_grid(rows: list, path, title: Optional[str] = None, col_titles: Optional[list] = None) -> Path:
    """Draw rows of panels [(title, kind, payload), ...] into one PNG."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = new_figure(n_rows, n_cols, (2.3 * n_cols, 2.75 * n_rows))
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            if j < len(row):
                draw_panel(ax, *row[j])
                if col_titles and i == 0 and j < len(col_titles):
                    ax.set_title(f"{col_titles[j]}\n{row[j][0]}", fontsize=7.5)
            else:
                ax.axis("off")
    return save_figure(fig, path, title)


def plot_tradeoff(rows: list, path, title: str = "accuracy vs compute") -> Path:
    """Top-1 vs GMACs per image: one curve per method from the dense model through its keep rates (the papers'
    trade-off figure). rows: [{'method', 'keep_rate', 'top1', 'gmacs', ('r')}, ...]."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    markers = iter("osD^Pv<>ph" * 4)  # one marker per curve, in order of appearance
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if method == "dense":
            ax.plot([mine[0]["gmacs"]], [mine[0]["top1"]], marker="*", ms=14, ls="", color="black", label="dense",
                    zorder=5)
            continue
        pts = sorted(mine + ([dense] if dense else []), key=lambda r: r["gmacs"])  # each curve starts at dense
        line, = ax.plot([r["gmacs"] for r in pts], [r["top1"] for r in pts], marker=next(markers),
                        ms=7, label=method)
        for r in mine:
            text = f"r={r['r']}" if r.get("r") else f"{r['keep_rate']:g}"
            ax.annotate(text, (r["gmacs"], r["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=line.get_color())
    path = _finish(fig, ax, "GMACs per image", "top-1 (%)", title, path)
    plt.close(fig)
    return path


def plot_diversity(curves: dict, path, title: str = "token diversity of the final tokens") -> Path:
    """curves: {method: [(keep_rate, mean diversity), ...]} -> a line plot."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for method, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    path = _finish(fig, ax, "keep rate", "diversity of the final tokens", title, path)
    plt.close(fig)
    return path
