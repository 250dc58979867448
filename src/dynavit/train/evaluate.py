"""Evaluation: top-1 / top-5 over a (sharded) loader, and the numbers a run's summary reports."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.transforms import eval_batch
from ..flops import count_gmacs
from ..timing import throughput as timed_throughput
from .dist import DistInfo, all_sum


def autocast(device: torch.device, dtype):
    """torch.autocast for `dtype` (None = full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, img_size: int, amp_dtype=None,
             info: DistInfo = None, progress: bool = False) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over every image of `loader`, summed over ranks.

    Returns {'top1', 'top5', 'loss', 'images', 'skipped', 'seconds'}.
    """
    info = info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = skipped = 0.0
    t0 = time.perf_counter()
    batches = loader
    if progress and info.main:
        batches = tqdm(loader, desc="eval", leave=False, mininterval=1.0)
    try:
        for images, labels, n_skipped in batches:
            skipped += n_skipped
            if labels.numel() == 0:
                continue
            x = eval_batch(images.to(device, non_blocking=True), img_size)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (B, k)
            hit = top.eq(labels[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
    finally:
        model.train(was_training)
    correct1, correct5, loss_sum, count, skipped = all_sum(info, [correct1, correct5, loss_sum, count, skipped])
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n,
            "images": int(count), "skipped": int(skipped), "seconds": time.perf_counter() - t0}


def throughput(model: nn.Module, device: torch.device, img_size: int, batch_size: int = 32, repeats: int = 3,
               amp_dtype=None) -> float:
    """Inference images / second: eval mode, fixed random batch, one warm-up, median of `repeats` timed runs."""
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), img_size, img_size, device=device)
    amp = autocast(device, amp_dtype) if amp_dtype is not None else None
    return timed_throughput(model, x, repeats, amp)


def model_numbers(model: nn.Module, img_size: int) -> dict:
    """GMACs per image (eval-mode, counted) and parameter count, on a CPU copy-free pass."""
    params = sum(p.numel() for p in model.parameters())
    try:
        device = next(model.parameters()).device
        x = torch.randn(1, getattr(model, "in_chans", 3), img_size, img_size, device=device)
        gmacs = count_gmacs(model, x)
    except Exception:  # noqa: BLE001 - a method the counter cannot trace must not lose the run's summary
        gmacs = None
    return {"gmacs": gmacs, "params": params}
