"""ImageNet-style folders: `ROOT/<split>/<class>/<image>`, decoded with PIL in DataLoader workers.

Classes are the sorted sub-folder names (as torchvision's ImageFolder, so label ids match its checkpoints).
An image that cannot be decoded is skipped with a warning naming it; the collate function drops it and counts
it, so a run reports how many images it skipped instead of crashing hours in.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import CheckpointNotFoundError, DataError
from .transforms import DEFAULT_CROP_PCT, pil_resize_center_crop, resize_size

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe")


def scan_folder(root: Path) -> tuple:
    """(classes, [(path, label)]) of an ImageNet-style split folder; raises DataError if empty."""
    if not root.is_dir():
        raise CheckpointNotFoundError(f"data folder not found: {str(root)!r} (expected <root>/<split>/<class>/...)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {str(root)!r}: expected {root}/<class>/<image>.jpg")
    samples = [(str(f), label) for label, c in enumerate(classes)
               for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) under {str(root)!r}")
    used = {label for _, label in samples}
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty:
        log.warning("class folder(s) %s in %s hold no images (%s, ...); they still count as classes (label ids "
                    "follow the sorted folder names)", ", ".join(map(repr, empty[:5])) + (" ..." if len(empty) > 5
                                                                                         else ""),
                    root, ", ".join(IMAGE_EXTENSIONS[:3]))
    return classes, samples


class ImageFolder(Dataset):
    """One split of an ImageNet-style folder as (uint8 tensor (3, S, S), label), or None if undecodable.

    Args:
        root: the split folder (e.g. `imagenet/train`). img_size: model input size. train: training images
        are resized to the crop size and centre-cropped to `resize_size(img_size)` (random crops happen later
        on the batch); eval images are resized to `resize_size` and centre-cropped to `img_size` (DeiT).
        classes: class names to use (e.g. the training split's), so label ids agree across splits.
    """

    def __init__(self, root, img_size: int = 224, train: bool = False, crop_pct: float = DEFAULT_CROP_PCT,
                 classes: Optional[list] = None):
        self.root = Path(root)
        found, self.samples = scan_folder(self.root)
        if classes is not None and found != list(classes):
            index = {c: i for i, c in enumerate(classes)}
            unknown = [c for c in found if c not in index]
            if unknown:
                raise DataError(f"classes {unknown[:5]} in {str(self.root)!r} are not in the training classes")
            self.samples = [(p, index[found[label]]) for p, label in self.samples]
            found = list(classes)
        self.classes = found
        resize = resize_size(img_size, crop_pct)
        self.resize, self.crop = (resize, resize) if train else (resize, img_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return pil_resize_center_crop(img, self.resize, self.crop), label
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            log.warning("skipping undecodable image %s: %s", path, e)
            return None


def collate_skip(batch: list) -> tuple:
    """Stack (image, label) pairs, dropping undecodable ones: (uint8 (B, 3, S, S), labels (B,), skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, skipped
