"""Error types a user can act on. Every message names the offending value and what is allowed."""
from __future__ import annotations

import difflib
from typing import Optional

import torch


class DynavitError(Exception):
    """Base class of every error dynavit raises on purpose (the CLI prints these in one line)."""


class ConfigError(DynavitError, ValueError):
    """A hyperparameter or argument outside its allowed range (keep_rate, r, budget, ...)."""


class InputError(DynavitError, ValueError):
    """An input tensor of the wrong size, channel count or dtype."""


class UnknownNameError(DynavitError, ValueError):
    """An unknown model or method name (the message suggests the closest known names)."""


class CheckpointError(DynavitError, ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


class CheckpointNotFoundError(DynavitError, FileNotFoundError):
    """A checkpoint or data path that does not exist."""


class WeightsUnavailableError(CheckpointNotFoundError):
    """Pretrained weights that are neither in the local cache nor downloadable (no network, offline mode)."""


class MissingExtraError(DynavitError, ImportError):
    """An optional dependency is not installed; the message names the `pip install` that brings it."""


class DataError(DynavitError, ValueError):
    """An empty or malformed dataset folder."""


class TrainingError(DynavitError, RuntimeError):
    """A run that cannot continue (NaN loss, output directory already in use, ...)."""


class OutputError(DynavitError, OSError):
    """An output path that cannot be written (read-only folder, a file where a folder is expected, ...)."""


def unknown_name(kind: str, name: str, known) -> UnknownNameError:
    """Build an UnknownNameError for `name` with a 'did you mean' from `known`."""
    known = sorted(known)
    lower = {str(k).lower(): k for k in known}
    close = difflib.get_close_matches(str(name).lower(), sorted(lower), n=3, cutoff=0.5)
    close = [lower[c] for c in close]  # case-insensitive: 'EViT' suggests 'evit'
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {shown}.")


def check_keep_rate(keep_rate, name: str = "keep_rate") -> float:
    """Validate a keep rate in (0, 1]."""
    try:
        value = float(keep_rate)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 1], got {keep_rate!r}") from None
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {keep_rate!r}")
    return value


def check_image_batch(x, in_chans: int, size: Optional[int] = None, min_size: Optional[int] = None,
                      model: str = "this model", why: str = "", fix: str = "") -> None:
    """Raise InputError unless `x` is a floating-point (B, in_chans, H, W) tensor whose size fits the model's rule:
    exactly `size` x `size` (`why` says what fixes it there, `fix` what else to do), or at least `min_size`."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected an image tensor (B, {in_chans}, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point image tensor, got dtype {x.dtype}; "
                         f"convert with x.float() / 255 and normalise")
    if x.ndim != 4:
        raise InputError(f"expected a 4-d image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise InputError(f"expected {in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    h, w = x.shape[2], x.shape[3]
    if size is not None and (h, w) != (size, size):
        raise InputError(f"{model} takes {size}x{size} images{why}, got {h}x{w}; resize the input, or build the "
                         f"model with img_size={h}{fix}")
    if min_size is not None and (h < min_size or w < min_size):
        raise InputError(f"{model} needs images of at least {min_size}x{min_size}, got {h}x{w}")
