"""What a run leaves on disk and how it survives: the output-directory lock and atomic, resumable checkpoints.

A checkpoint is a folder `RUN_DIR/checkpoints/step-XXXXXXXX/` holding
- `model.safetensors` (and `ema.safetensors`): the weights, readable by `dynavit.load_checkpoint`;
- `state.pt`: optimiser, grad scaler, step / epoch / batch position and every rank's RNG states, made of plain
  tensors, numbers and strings only, so it loads with `torch.load(weights_only=True)`.
It is written under a temporary name and renamed when complete: a run killed while writing leaves the previous
checkpoint intact, and `latest_checkpoint` never returns a half-written one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint import read_checkpoint, save_checkpoint
from ..errors import CheckpointError, TrainingError

CKPT_DIR = "checkpoints"
KEEP_LAST = 2


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock (released by the OS even if the process is killed)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TrainingError(f"output directory {str(self.path.parent)!r} is in use by a running training "
                                f"({holder}); wait for it or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy, Python) as plain tensors / numbers."""
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
           "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list:
    """Complete checkpoint folders, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "state.pt").exists())


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_run_checkpoint(run_dir: Path, step: int, model_state: dict, ema_state: Optional[dict],
                        train_state: dict, keep_last: int = KEEP_LAST) -> Path:
    """Write checkpoint `step` atomically (temporary folder, then rename); prune all but the last `keep_last`."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(model_state, tmp / "model.safetensors", metadata={"step": step})
    if ema_state is not None:
        save_checkpoint(ema_state, tmp / "ema.safetensors", metadata={"step": step, "ema": True})
    torch.save(train_state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_run_checkpoint(path: Path) -> tuple:
    """(model state, ema state or None, train state) of a checkpoint folder, all loaded safely."""
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"cannot read training state {str(path / 'state.pt')!r}: {e}") from None
    model = read_checkpoint(path / "model.safetensors")
    ema = read_checkpoint(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    return model, ema, state


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
