"""Image transforms: the DeiT evaluation transform (PIL, in DataLoader workers) and the DeiT training
augmentation applied to whole batches on the training device with kornia.

DeiT's RandomResizedCrop (area 0.08-1, aspect 3/4-4/3, bicubic) runs in the DataLoader workers on the full
original image (`random_resized_crop`), drawn from a generator seeded by (seed, epoch, image index), so a run and
its resumption crop alike whatever the number of workers; the rest (flip, RandAugment, erasing, mixup / cutmix)
happens on the batch, on the device, drawing from torch's global RNG (saved in checkpoints). Datasets that render
fixed squares (the demo) leave the crop to the batch (`TrainAugment(crop=True)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875


def resize_size(img_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter-side size before the centre crop (DeiT: int(img_size / crop_pct), 256 for 224)."""
    return int(img_size / crop_pct)


def pil_resize_center_crop(img, resize: int, crop: int):
    """PIL image -> uint8 tensor (3, crop, crop): shorter side to `resize` (bicubic), then a centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, crop, crop)


def random_resized_crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            generator: torch.Generator = None) -> tuple:
    """DeiT's (torchvision's) RandomResizedCrop window (left, top, w, h) on a width x height image.

    Up to 10 draws of area ~ U(scale) * W * H and log aspect ~ U(log ratio); the first window that fits wins.
    Otherwise the whole image, cut to the nearest allowed aspect ratio, centred.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def pil_random_resized_crop(img, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            generator: torch.Generator = None):
    """PIL image -> uint8 tensor (3, size, size): a RandomResizedCrop window of the full image, resized bicubically."""
    img = img.convert("RGB")
    left, top, w, h = random_resized_crop_box(img.size[0], img.size[1], scale, ratio, generator)
    img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, size, size)


def normalize(x: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised by the ImageNet mean / std."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def resize_batch(x: Tensor, img_size: int) -> Tensor:
    """Float batch (B, 3, h, w) -> (B, 3, img_size, img_size), antialiased, only when the size differs."""
    if x.shape[-2:] == (img_size, img_size):
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)


def to_float(images: Tensor, img_size: int) -> Tensor:
    """uint8 batch (B, 3, h, w) -> float in [0, 1] at (img_size, img_size)."""
    return resize_batch(images.float().div_(255.0), img_size)


def eval_batch(images: Tensor, img_size: int) -> Tensor:
    """Evaluation: the worker already resized and centre-cropped; convert and normalise. (B, 3, S, S)."""
    return normalize(to_float(images, img_size))


@dataclass
class AugmentConfig:
    """DeiT's recipe (timm `rand-m9-mstd0.5-inc1`, mixup 0.8, cutmix 1.0, smoothing 0.1, reprob 0.25)."""

    scale: tuple = (0.08, 1.0)  # RandomResizedCrop area range ((1, 1): no random crop, the centre crop)
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5
    randaugment: bool = True  # 2 ops at magnitude 9 of 10
    randaugment_m: int = 9
    color_jitter: float = 0.4  # used only without RandAugment, as timm does
    erasing: float = 0.25  # random erasing probability (erased area = 0 after normalisation = the mean colour)
    mixup: float = 0.8  # Beta(alpha, alpha) mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) cutmix; 0 = off
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    smoothing: float = 0.1  # label smoothing of the (mixed) targets

    @property
    def random_crop(self) -> bool:
        return tuple(self.scale) != (1.0, 1.0)

    @property
    def needs_kornia(self) -> bool:
        """kornia runs the batched crop (datasets that do not crop on the worker), flip, RandAugment, jitter and
        erasing; `none` (and mixup / cutmix / smoothing alone) need no kornia."""
        return self.random_crop or self.hflip > 0 or self.randaugment or self.color_jitter > 0 or self.erasing > 0

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(scale=(1.0, 1.0), hflip=0.0, randaugment=False, color_jitter=0.0, erasing=0.0, mixup=0.0,
                   cutmix=0.0, smoothing=0.0)

    @classmethod
    def light(cls) -> "AugmentConfig":
        """Crop + flip + smoothing only (short fine-tunes, small datasets)."""
        return cls(scale=(0.35, 1.0), randaugment=False, color_jitter=0.0, erasing=0.0, mixup=0.0, cutmix=0.0)


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) -> (B, K) one-hot with label smoothing (timm: off = smoothing / K, on = 1 - smoothing + off)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_batch(x: Tensor, labels: Tensor, num_classes: int, cfg: AugmentConfig) -> tuple:
    """Mixup or CutMix with the batch's reverse, one lambda per batch (timm `Mixup`, mode 'batch').

    Written here rather than taken from kornia because kornia samples mixup's lambda uniformly while DeiT draws
    it from Beta(0.8, 0.8). Returns (x (B, 3, H, W), soft targets (B, K)).
    """
    targets = soft_targets(labels, num_classes, cfg.smoothing)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or torch.rand(()).item() < cfg.switch_prob)
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    if alpha <= 0:
        return x, targets
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)  # the area actually pasted
    else:
        x = x * lam + flipped * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam)


class TrainAugment(nn.Module):
    """Batched DeiT training augmentation on the device (kornia). uint8 (B, 3, h, w) -> (normalised x, targets).

    targets are soft (B, K) when mixup / cutmix / smoothing are on, else the integer labels (B,).
    crop: run RandomResizedCrop here, on the batch (for datasets that do not crop on the worker, e.g. the demo);
        False when the workers already cropped each original image (`ImageFolder(random_crop=...)`).
    kornia is imported only when an operation needs it (`AugmentConfig.needs_kornia`).
    """

    def __init__(self, img_size: int, num_classes: int, cfg: AugmentConfig = None, crop: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or AugmentConfig()
        self.img_size, self.num_classes = img_size, num_classes
        batch_crop = crop and cfg.random_crop
        pixel = batch_crop or cfg.hflip > 0 or cfg.randaugment or cfg.color_jitter > 0
        if pixel or cfg.erasing > 0:
            import kornia.augmentation as K
        ops = []
        if batch_crop:
            ops.append(K.RandomResizedCrop((img_size, img_size), scale=cfg.scale, ratio=cfg.ratio,
                                           resample="BICUBIC"))
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.randaugment:
            from kornia.augmentation.auto import RandAugment

            # kornia's magnitude scale is 0..30 where timm's is 0..10: m9 of 10 = 27 of 30
            ops.append(RandAugment(n=2, m=cfg.randaugment_m * 3))
        elif cfg.color_jitter > 0:
            cj = cfg.color_jitter
            ops.append(K.ColorJitter(cj, cj, cj, 0.0, p=1.0))
        self.pixel_ops = nn.Sequential(*ops)
        self.erase = K.RandomErasing(p=cfg.erasing, value=0.0) if cfg.erasing > 0 else None

    @property
    def soft(self) -> bool:
        c = self.cfg
        return c.mixup > 0 or c.cutmix > 0 or c.smoothing > 0

    @torch.no_grad()
    def forward(self, images: Tensor, labels: Tensor) -> tuple:
        x = images.float().div_(255.0)  # (B, 3, h, w) in [0, 1]
        if len(self.pixel_ops):
            x = self.pixel_ops(x).clamp_(0, 1)
        elif x.shape[-1] > self.img_size:  # no random crop: the centre crop, as in evaluation
            top, left = (x.shape[-2] - self.img_size) // 2, (x.shape[-1] - self.img_size) // 2
            x = x[..., top:top + self.img_size, left:left + self.img_size]
        x = normalize(resize_batch(x, self.img_size))
        if self.erase is not None:
            x = self.erase(x)
        if not self.soft:
            return x, labels
        return mix_batch(x, labels, self.num_classes, self.cfg)

