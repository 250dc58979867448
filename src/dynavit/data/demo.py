"""The embedded `demo` dataset: handwritten digits hidden in photographs, made from data shipped with dependencies.

Each image is a square crop of one of scikit-image's bundled photographs (only files inside the wheel; no
download), with one real handwritten digit from scikit-learn's `load_digits` (8x8, 1,797 samples) drawn at a
random position and scale (3/14 to 6/14 of the image side, i.e. about 3x3 to 6x6 of the 14x14 patches: 5-18% of
them) plus zero to two distractor strokes of the same ink. The label is the digit, so a minority of patches
carries the label, the premise of token reduction. Sizes are given at the 224-pixel reference and scale with
the rendered size (the demo backbone sees 112 px).

Everything is a pure function of (seed, split, index): an image is rendered on demand in about a millisecond,
which is faster than any model here consumes it, so no cache is needed; `materialize` writes a split to a
`.npy` (uint8, N x 224 x 224 x 3) under `~/.cache/dynavit` for repeated GPU runs. Train and val use disjoint
source digits (a stratified 80/20 split of the 1,797), so validation measures recognition of unseen handwriting.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError

IMAGE_SIZE = 224
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 5000, "val": 2000}
VAL_FRACTION = 0.2
VERSION = 3  # bump when rendering changes (names the cache files)
# scikit-image photographs bundled in its wheel (checked: no pooch download needed)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "camera", "coins", "moon", "grass", "gravel", "brick", "clock", "cell")
# v1 used 40-84 px and 2-5 strokes, v2 64-128 px and 1-3 strokes (docs/demo.md has the learning curves): v3's
# smaller digits fit the receptive field of one token of the demo stem, which is what made the task learnable
SCALE_RANGE = (48, 96)  # digit side in pixels at the 224-pixel reference
STROKES_RANGE = (0, 2)  # distractor strokes per image


@functools.lru_cache(maxsize=None)
def _photos() -> tuple:
    """The background photographs as RGB uint8 arrays (loaded once per process)."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _digits() -> tuple:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def source_split(seed: int = 0) -> dict:
    """Indices of the source digits of each split: stratified per class, disjoint, deterministic per seed."""
    _, labels = _digits()
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * VAL_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a random photograph, resized to (size, size, 3), randomly flipped."""
    from PIL import Image

    photo = _photos()[rng.integers(len(PHOTOS))]
    H, W = photo.shape[:2]
    side = int(min(H, W) * rng.uniform(0.35, 1.0))
    top, left = rng.integers(0, H - side + 1), rng.integers(0, W - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    out = np.asarray(crop.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.float32)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _ink(rng: np.random.Generator, background_mean: float) -> np.ndarray:
    """An ink colour that contrasts with the local background: light on dark, dark on light, slightly tinted."""
    base = 235.0 if background_mean < 128 else 20.0
    return np.clip(base + rng.normal(0, 18, size=3), 0, 255).astype(np.float32)


def _strokes(rng: np.random.Generator, size: int, side: float, count: int) -> np.ndarray:
    """A (size, size) alpha mask of `count` random line and arc strokes as long and as wide as a digit of `side`."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        x0, y0 = rng.uniform(0, size, 2)
        length = rng.uniform(0.5, 1.0) * side
        w = max(1, int(round(side / 7 * rng.uniform(0.7, 1.3))))
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * np.pi)
            draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))], fill=255, width=w)
        else:
            r = length / 2
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(60, 200), fill=255, width=w)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _placement(seed: int, split: str, index: int, size: int) -> tuple:
    """The first draws of image `index`: (its rng, advanced past them; background (size, size, 3); the digit's
    box (top, left, side) in pixels). `render` continues from the returned rng."""
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    img = _background(rng, size)
    side = int(rng.integers(SCALE_RANGE[0], SCALE_RANGE[1] + 1) * size / IMAGE_SIZE)
    top, left = rng.integers(0, size - side + 1, 2)
    return rng, img, (int(top), int(left), side)


def digit_box(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> tuple:
    """(top, left, side) in pixels of the square the digit of image `index` is drawn into (as `render` draws it)."""
    return _placement(seed, split, index, size)[2]


def render(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> tuple:
    """Image `index` of `split`: (uint8 array (size, size, 3), label, source digit index). Pure function."""
    from PIL import Image

    sources = source_split(seed)[split]
    images, labels = _digits()
    rng, img, (top, left, side) = _placement(seed, split, index, size)
    order = np.random.default_rng([seed, 3 if split == "train" else 4, index // len(sources)])
    src = int(sources[order.permutation(len(sources))[index % len(sources)]])
    digit = Image.fromarray((images[src] * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    alpha = np.clip((np.asarray(digit, dtype=np.float32) / 255.0 - 0.25) / 0.4, 0, 1)  # crisp strokes, no box
    strokes = _strokes(rng, size, side, count=int(rng.integers(*STROKES_RANGE, endpoint=True)))
    mask = strokes
    mask[top:top + side, left:left + side] = np.maximum(mask[top:top + side, left:left + side], alpha)
    ink = _ink(rng, float(img[top:top + side, left:left + side].mean()))
    out = img * (1 - mask[..., None]) + ink * mask[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), int(labels[src]), src


def _cache_path(seed: int, split: str, n: int, size: int, cache_dir: Optional[str]) -> Path:
    root = Path(cache_dir or os.environ.get("DYNAVIT_CACHE", Path.home() / ".cache" / "dynavit"))
    return root / f"demo-v{VERSION}-seed{seed}-{split}-{n}-{size}.npy"


def materialize(seed: int = 0, split: str = "train", n: Optional[int] = None, size: int = IMAGE_SIZE,
                cache_dir: Optional[str] = None) -> Path:
    """Render a whole split once into a uint8 `.npy` (N, size, size, 3) (+ `.labels.npy`); returns its path."""
    n = SPLIT_SIZES[split] if n is None else n
    path = _cache_path(seed, split, n, size, cache_dir)
    labels_path = path.with_suffix(".labels.npy")
    if path.exists() and labels_path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        arr[i], labels[i], _ = render(seed, split, i, size)
    arr.flush()
    del arr
    np.save(labels_path, labels)
    os.replace(tmp, path)
    return path


class DemoDataset(Dataset):
    """The demo split as a map-style dataset of (uint8 tensor (3, size, size), label).

    Args:
        split: 'train' or 'val'. seed: rendering seed. n: number of images (default 5000 / 1000).
        size: side in pixels (rendered at this size). cache: read from (and create) the `.npy` cache.
    """

    classes = [str(c) for c in range(NUM_CLASSES)]

    def __init__(self, split: str = "train", seed: int = 0, n: Optional[int] = None, size: int = IMAGE_SIZE,
                 cache: bool = False, cache_dir: Optional[str] = None):
        if split not in SPLIT_SIZES:
            raise ConfigError(f"demo split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
        self.split, self.seed, self.size = split, int(seed), int(size)
        self.n = SPLIT_SIZES[split] if n is None else int(n)
        if self.n < 1:
            raise ConfigError(f"demo dataset size must be >= 1, got {n!r}")
        self._array = self._labels = None
        if cache:
            path = materialize(self.seed, split, self.n, self.size, cache_dir)
            self._array = np.load(path, mmap_mode="r")
            self._labels = np.load(path.with_suffix(".labels.npy"))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if self._array is not None:
            img, label = np.array(self._array[index]), int(self._labels[index])
        else:
            img, label, _ = render(self.seed, self.split, int(index), self.size)
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), label

    def fingerprint(self, count: int = 8) -> str:
        """Hash of the first `count` images and labels (to check determinism)."""
        h = hashlib.sha256()
        for i in range(min(count, self.n)):
            img, label = self[i]
            h.update(img.numpy().tobytes())
            h.update(bytes([label]))
        return h.hexdigest()[:16]
