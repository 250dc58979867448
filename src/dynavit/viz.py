"""Pictures of what a method did to an image: kept / pruned patches, merged groups, DiT routing.

Everything is drawn from the `ReductionInfo` a forward returns with `return_info=True`, so one function serves
every method: `info.patch_to_token[stage]` says which token holds each original patch (-1 once pruned). Pruned
patches are faded to white (DynamicViT's figure), patches that share a token with others are tinted with the
group's colour and outlined (BAT's Figure 5, ToMe's merged groups, EViT's fused token), and single-patch tokens
are left as they are. DiT's routing is drawn as the number of blocks each location went through (a panel), or as
the paper's visualisation (`save_routing_grid`): rows = strides 4..32, columns = stages, the image shown where a
token of that stride ran a block in that stage and white elsewhere.

matplotlib is an optional dependency (`pip install dynavit[plot]`); it is imported when a figure is drawn.
"""
from __future__ import annotations

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
    import colorsys

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


def routing_depth(info, grid: tuple) -> Tensor:
    """DiT: (B, gh, gw) number of routing nodes (blocks) run for each finest-scale location."""
    runs = torch.stack([(p2t >= 0).float() for p2t in info.patch_to_token], 0).sum(0)  # (B, N0)
    return runs.view(runs.shape[0], *grid)


def draw_routing(ax, image: np.ndarray, depth: Tensor, max_depth: int) -> None:
    """Blocks run per location (DiT) as a heat map over the image."""
    ax.imshow(image)
    H, W = image.shape[:2]
    ax.imshow(depth.cpu().numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=max_depth, extent=(0, W, H, 0),
              interpolation="nearest")


def describe(patch_to_token: Tensor) -> str:
    """'67 kept' / '67 tokens, 12 merged groups' for a one-image patch map (a panel's caption)."""
    p2t = patch_to_token[patch_to_token >= 0]
    ids, counts = torch.unique(p2t, return_counts=True)
    merged = int((counts > 1).sum())
    return f"{len(ids)} tokens" + (f", {merged} merged" if merged else "")


def model_grid(model) -> tuple:
    """The (rows, cols) patch grid of a ViT or the finest DiT scale."""
    if hasattr(model, "grid_size"):
        return tuple(model.grid_size)
    size = getattr(model, "img_size", 224)
    return (size // 4, size // 4)  # PVTv2 / DiT: stride-4 stem


def panels_for(model, x: Tensor, labels: Optional[Sequence[str]] = None,
               class_names: Optional[Sequence[str]] = None) -> list:
    """Run `model` on a batch (B, 3, H, W) and return, per image, a list of (title, kind, payload) panels.

    The last panel names the predicted class (`class_names[i]` when given, else the index)."""
    model.eval()
    with torch.no_grad():
        logits, info = model(x, return_info=True)
    pred = logits.argmax(-1)
    grid = model_grid(model)
    out = []
    for b in range(x.shape[0]):
        image = to_uint8_image(x[b])
        panels = [(f"input" + (f" ({labels[b]})" if labels else ""), "image", image)]
        if "gmacs_full" in info.extra:  # DiT routing
            depth = routing_depth(info, grid)[b]
            panels.append((f"DiT: blocks run, {float(info.extra['gmacs'][b]):.3f} GMACs", "routing",
                           (image, depth, len(info.patch_to_token))))
        else:
            for s, p2t in enumerate(info.patch_to_token):
                panels.append((f"stage {s + 1}: {describe(p2t[b])}", "overlay",
                                token_overlay(image, p2t[b], grid)))
        k = int(pred[b])
        name = class_names[k] if class_names is not None and k < len(class_names) else k
        panels[-1] = (panels[-1][0] + f"\npredicted {name}", *panels[-1][1:])
        out.append(panels)
    return out


def routing_tile(image: np.ndarray, active: Tensor, size: tuple) -> np.ndarray:
    """The image where `active` (N,) tokens of a (h, w) scale are, white elsewhere (float RGB in [0, 1])."""
    H, W = image.shape[:2]
    m = active.detach().cpu().view(1, 1, *size).float()
    stride_h, stride_w = -(-H // size[0]), -(-W // size[1])
    up = m.repeat_interleave(stride_h, 2).repeat_interleave(stride_w, 3)[0, 0, :H, :W].numpy()[..., None]
    return (image.astype(np.float32) / 255.0) * up + (1.0 - up)


def dit_routing_rows(model, x: Tensor) -> list:
    """Per image: (uint8 image, tiles[stride row][stage col], GMACs, predicted class) for `save_routing_grid`."""
    from .models.dit import stage_activity

    model.eval()
    with torch.no_grad():
        logits, info = model(x, return_info=True)
    act, sizes = stage_activity(info), info.extra["scale_sizes"]
    out = []
    for b in range(x.shape[0]):
        image = to_uint8_image(x[b])
        tiles = [[routing_tile(image, act[i][k][b], sizes[i]) for k in range(4)] for i in range(4)]
        counts = [[int(act[i][k][b].sum()) for k in range(4)] for i in range(4)]
        out.append((image, tiles, counts, float(info.extra["gmacs"][b]), int(logits[b].argmax())))
    return out


def save_routing_grid(model, x: Tensor, path, labels: Optional[Sequence[str]] = None,
                      title: Optional[str] = None) -> Path:
    """DiT's routing as in the paper's visualisation: per image, the input and a 4 x 4 grid (rows = strides
    4, 8, 16, 32; columns = PVTv2 stages 1-4) of the tokens that ran a block there."""
    plt = _pyplot()
    rows = dit_routing_rows(model, x)
    fig, axes = plt.subplots(4 * len(rows), 5, figsize=(2.0 * 5, 2.0 * 4 * len(rows)), squeeze=False)
    for b, (image, tiles, counts, gmacs, pred) in enumerate(rows):
        for i in range(4):
            for col in range(5):
                ax = axes[4 * b + i][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    if i == 0:
                        ax.imshow(image)
                        name = f" ({labels[b]})" if labels else ""
                        ax.set_title(f"input{name}\n{gmacs:.4g} GMACs, predicted {pred}", fontsize=7.5)
                    else:
                        ax.axis("off")
                    continue
                ax.imshow(tiles[i][col - 1])
                ax.set_title(f"{counts[i][col - 1]} tokens", fontsize=6.5)
                if i == 0:
                    ax.set_title(f"stage {col}\n{counts[i][col - 1]} tokens", fontsize=7.5)
                if col == 1:
                    ax.set_ylabel(f"stride {4 * 2 ** i}", fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_panel(ax, title: str, kind: str, payload) -> None:
    if kind == "routing":
        draw_routing(ax, *payload)
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


def save_grid(rows: list, path, title: Optional[str] = None, col_titles: Optional[list] = None) -> Path:
    """Draw rows of panels [(title, kind, payload), ...] into one PNG."""
    plt = _pyplot()

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.3 * n_cols, 2.75 * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            if j < len(row):
                draw_panel(ax, *row[j])
                if col_titles and i == 0 and j < len(col_titles):
                    ax.set_title(f"{col_titles[j]}\n{row[j][0]}", fontsize=7.5)
            else:
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list, path, title: str = "accuracy vs compute") -> Path:
    """Top-1 vs GMACs per image: one curve per method from the dense model through its keep rates (the papers'
    trade-off figure). rows: [{'method', 'keep_rate', 'top1', 'gmacs', ('r')}, ...]."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    markers = {"dense": "*", "dynamicvit": "o", "evit": "s", "bat": "D", "tome": "^", "dit": "P"}
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if method == "dense":
            ax.plot([mine[0]["gmacs"]], [mine[0]["top1"]], marker="*", ms=14, ls="", color="black", label="dense",
                    zorder=5)
            continue
        pts = sorted(mine + ([dense] if dense else []), key=lambda r: r["gmacs"])  # each curve starts at dense
        line, = ax.plot([r["gmacs"] for r in pts], [r["top1"] for r in pts], marker=markers.get(method, "o"),
                        ms=7, label=method)
        for r in mine:
            text = f"r={r['r']}" if r.get("r") else f"{r['keep_rate']:g}"
            ax.annotate(text, (r["gmacs"], r["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=line.get_color())
    path = _finish(fig, ax, "GMACs per image", "top-1 (%)", title, path)
    plt.close(fig)
    return path


def plot_diversity(curves: dict, path, title: str = "token diversity (BAT Eq. 4)") -> Path:
    """curves: {method: [(keep_rate, mean diversity), ...]} -> a line plot."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for method, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    path = _finish(fig, ax, "keep rate", "diversity of the final tokens", title, path)
    plt.close(fig)
    return path
