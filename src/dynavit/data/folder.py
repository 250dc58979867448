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
from .transforms import DEFAULT_CROP_PCT, pil_random_resized_crop, pil_resize_center_crop, resize_size

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
        root: the split folder (e.g. `imagenet/train`). img_size: model input size. train: training images.
        random_crop: (scale, ratio) of DeiT's RandomResizedCrop, done here on the full original image (training
            only): each item is then a (3, img_size, img_size) crop drawn from a generator seeded by (seed, epoch,
            index), the epoch coming with the index from the sampler (`make_loader` asks it to). Without it,
            training images are resized and centre-cropped to `resize_size(img_size)` squares, for a crop on the
            batch; eval images are resized to `resize_size` and centre-cropped to `img_size` (DeiT).
        classes: class names to use (e.g. the training split's), so label ids agree across splits.
        seed: the run's seed (random_crop only).
    """

    def __init__(self, root, img_size: int = 224, train: bool = False, crop_pct: float = DEFAULT_CROP_PCT,
                 classes: Optional[list] = None, random_crop: Optional[tuple] = None, seed: int = 0):
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
        self.img_size, self.seed = img_size, seed
        self.random_crop = tuple(random_crop) if train and random_crop is not None else None
        self.crops_on_worker = self.random_crop is not None  # read by the Trainer: no second crop on the batch
        self.wants_epoch = self.crops_on_worker  # read by make_loader: the sampler yields (index, epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def crop_generator(self, index: int, epoch: int) -> torch.Generator:
        """The crop's RNG: a pure function of (seed, epoch, index), so workers, ranks and resumed runs agree."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2 ** 63)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                if self.random_crop is not None:
                    scale, ratio = self.random_crop
                    gen = self.crop_generator(index, epoch)
                    return pil_random_resized_crop(img, self.img_size, scale, ratio, gen), label
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
