"""The training loop: AdamW + cosine schedule, AMP, gradient accumulation and clipping, EMA, DDP, NaN stop,
atomic checkpoints and bit-for-bit resume.

Determinism contract: everything random is drawn from the global torch / numpy / Python RNGs of each rank
(seeded with seed + rank) or from generators keyed by (seed, epoch); checkpoints store all RNG states and the
position in the epoch, so a run killed after step k and resumed produces the same weights as an uninterrupted
one. The data order is independent of the world size, so W processes with batch B follow the same trajectory
as one process with batch W*B (up to float summation order).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..data import make_loader
from ..data.transforms import AugmentConfig, TrainAugment
from ..errors import ConfigError, TrainingError
from . import dist as D
from .evaluate import autocast, evaluate, model_numbers, throughput
from .optim import WARMUP_STYLES, ModelEma, cosine_lr, keep_rate_at, param_groups
from .state import (RunLock, append_jsonl, latest_checkpoint, load_run_checkpoint, rng_state, save_run_checkpoint,
                    set_rng_state)


log = logging.getLogger("dynavit")

@dataclass
class TrainConfig:
    """Everything the loop needs, in optimiser steps once `steps_per_epoch` is known (epochs may be fractional)."""

    output: str
    epochs: float = 1.0  # ignored when max_steps is set
    max_steps: Optional[int] = None  # total optimiser steps (overrides epochs)
    batch_size: int = 64  # per process, per micro-batch
    accum_steps: int = 1  # micro-batches per optimiser step
    lr: float = 5e-4  # peak lr (already scaled to the global batch)
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0
    warmup_start: float = 1e-6  # lr at the first warm-up step
    warmup_style: str = "linear"  # linear | linspace (DynamicViT release: np.linspace(start, lr, warmup steps))
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None  # max global grad norm (None = no clipping)
    backbone_lr_scale: float = 1.0
    head_patterns: tuple = ()  # parameters at the full lr when backbone_lr_scale != 1
    frozen_patterns: tuple = ()  # parameters never trained
    freeze_backbone_epochs: float = 0.0  # 'backbone' parameters not updated for this long
    freeze_mode: str = "no_grad"  # no_grad: their gradients are dropped | zero_lr: lr 0, AdamW still sees them
    ema_decay: float = 0.0  # 0 = no EMA
    amp: str = "auto"  # auto | none | bf16 | fp16
    seed: int = 0
    img_size: int = 224
    num_classes: int = 1000
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    keep_rate: Optional[float] = None  # target keep rate of a keep-rate schedule
    keep_schedule: Optional[tuple] = None  # (start, length) as fractions of training
    workers: Optional[int] = None
    save_every: int = 0  # also checkpoint every N optimiser steps (0: epoch ends only)
    log_every: int = 10
    eval_every_epoch: bool = True
    resume: bool = False
    extend: bool = False  # with resume: continue a run to a new (larger) length, the schedules recomputed for it
    find_unused_parameters: bool = False
    tensorboard: bool = False
    stop_after_step: Optional[int] = None  # testing: exit abruptly right after this step's checkpoint


# How a frozen backbone is held still. no_grad: its gradients are set to None before the step, so AdamW skips
# it (moments and step count start when it is released). zero_lr: its lr is 0 while AdamW steps it as usual
# (moments and step count advance, weights do not move: lr * update = 0 and 1 - lr * wd = 1), the DynamicViT
# release's `fix_step` (docs/dynamicvit.md).
FREEZE_MODES = ("no_grad", "zero_lr")


def resolve_amp(amp: str, device: torch.device):
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class Trainer:
    """One run: `Trainer(model, criterion, train_set, val_set, cfg, info).fit() -> summary dict`."""

    def __init__(self, model: nn.Module, criterion: nn.Module, train_set, val_set, cfg: TrainConfig,
                 info: Optional[D.DistInfo] = None, meta: Optional[dict] = None):
        check_config(cfg)
        self.cfg, self.info = cfg, info or D.DistInfo()
        self.meta = meta or {}
        self.run_dir = Path(cfg.output)
        self.device = self.info.device
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.model = model.to(self.device)
        self.criterion = criterion.to(self.device)
        self.needs_info = getattr(criterion, "needs_info", False)  # e.g. a budget loss reads the routed cost
        self.groups = param_groups(self.model, cfg.weight_decay, cfg.head_patterns, cfg.backbone_lr_scale,
                                   cfg.frozen_patterns)
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in self.groups],
                                           lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.net = self.model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=cfg.find_unused_parameters)
        self.train_loader = make_loader(train_set, cfg.batch_size, True, self.info.rank, self.info.world, cfg.seed,
                                        cfg.workers, pin_memory=self.device.type == "cuda")
        self.val_loader = (make_loader(val_set, cfg.batch_size, False, self.info.rank, self.info.world, cfg.seed,
                                       cfg.workers) if val_set is not None else None)
        self.augment = TrainAugment(cfg.img_size, cfg.num_classes, cfg.augment,
                                    crop=not getattr(train_set, "crops_on_worker", False))
        micro = self.train_loader.sampler.steps_per_epoch()
        self.steps_per_epoch = micro // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise TrainingError(f"an epoch of {len(train_set)} images has fewer than one optimiser step at batch "
                                f"{cfg.batch_size} x {self.info.world} processes x {cfg.accum_steps} accumulation; "
                                f"lower --batch-size")
        spe = self.steps_per_epoch
        self.total_steps = int(cfg.max_steps) if cfg.max_steps is not None else max(1, int(round(cfg.epochs * spe)))
        self.num_epochs = math.ceil(self.total_steps / spe)
        self.warmup_steps = int(round(cfg.warmup_epochs * spe))
        self.freeze_steps = int(round(cfg.freeze_backbone_epochs * spe))
        if cfg.freeze_mode not in FREEZE_MODES or cfg.warmup_style not in WARMUP_STYLES:
            raise TrainingError(f"freeze_mode must be one of {list(FREEZE_MODES)} and warmup_style one of "
                                f"{list(WARMUP_STYLES)}, got {cfg.freeze_mode!r}, {cfg.warmup_style!r}")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_train = 0  # undecodable training images met (each time one is read)
        self.empty_steps = 0  # optimiser steps skipped because every image of the batch was undecodable
        self.lock = None
        self.writer = None

    # ------------------------------------------------------------------ schedules
    def _apply_schedules(self) -> Optional[float]:
        cfg = self.cfg
        lr = cosine_lr(self.step, self.total_steps, cfg.lr, self.warmup_steps, cfg.min_lr, cfg.warmup_start,
                       cfg.warmup_style)
        frozen = cfg.freeze_mode == "zero_lr" and self.step < self.freeze_steps
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if frozen and group["part"] == "backbone" else lr * group["lr_scale"]
        self.lr = lr
        reducer = getattr(self.model, "reducer", None)
        keep = None
        if self.cfg.keep_schedule and self.cfg.keep_rate is not None and reducer is not None:
            start, length = self.cfg.keep_schedule
            keep = keep_rate_at(self.step, self.cfg.keep_rate, int(start * self.total_steps),
                                int(length * self.total_steps))
            reducer.set_keep_rate(keep)
        if hasattr(self.criterion, "set_progress"):
            self.criterion.set_progress(self.step / self.total_steps)
        return keep if keep is not None else self.cfg.keep_rate

    # ------------------------------------------------------------------ checkpoints
    def _train_state(self) -> dict:
        rngs = D.gather_objects(self.info, rng_state())
        counts = D.gather_objects(self.info, [self.skipped_train, self.empty_steps])  # per rank
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world": self.info.world, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {}, "rng": rngs,
                "total_steps": self.total_steps, "config": json.dumps(asdict(self.cfg), default=str),
                "counts": counts}

    def save(self) -> None:
        state = self._train_state()  # collective: every rank takes part
        if self.info.main:
            save_run_checkpoint(self.run_dir, self.step, self.model.state_dict(),
                                self.ema.state_dict() if self.ema else None, state)
        D.barrier(self.info)

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.info.main:
                log.info(f"--resume: no checkpoint in {self.run_dir}, starting from step 0")
            return
        model_sd, ema_sd, state = load_run_checkpoint(path)
        old_total = state.get("total_steps")
        if old_total != self.total_steps:
            finished = state["step"] >= (old_total or 0)
            if not self.cfg.extend:
                raise TrainingError(
                    f"cannot resume {str(path)!r}: it was a run of {old_total} steps, this one has "
                    f"{self.total_steps} (keep --epochs / --max-steps / --batch-size to continue it bit for bit"
                    + (", or add --extend to train the finished run further with the schedule recomputed)"
                       if finished else ", or add --extend to change its length, the schedule recomputed)"))
            if self.total_steps <= state["step"]:
                raise TrainingError(f"--extend: the run in {str(self.run_dir)!r} is already at step {state['step']}; "
                                    f"give more than that (it has {self.total_steps} steps now)")
            if self.info.main:
                print(f"--extend: {old_total} -> {self.total_steps} steps; the lr and keep-rate schedules are "
                      f"recomputed for the new length from step {state['step']} (as DeiT's main.py on resume)")
        self.model.load_state_dict(model_sd)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and ema_sd is not None:
            self.ema.load_state_dict(ema_sd)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        counts = state.get("counts") or [[0, 0]]
        if state["world"] == self.info.world:
            self.skipped_train, self.empty_steps = (int(c) for c in counts[self.info.rank])
        elif self.info.main:  # another world size: rank 0 carries the totals
            self.skipped_train, self.empty_steps = (int(sum(c[i] for c in counts)) for i in range(2))
        if state["world"] == self.info.world:
            set_rng_state(state["rng"][self.info.rank])
        elif self.info.main:
            warnings.warn(f"resuming a {state['world']}-process run on {self.info.world}: RNG streams restart")
        if self.info.main:
            self._truncate_log()
            log.info(f"resumed from {path} (step {self.step}, epoch {self.epoch})")

    def _truncate_log(self) -> None:
        log = self.run_dir / "log.jsonl"
        if log.exists():
            keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= self.step]
            log.write_text("".join(ln + "\n" for ln in keep))

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict) -> None:
        if self.info.main:
            append_jsonl(self.run_dir / "log.jsonl", record)
            if self.writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        self.writer.add_scalar(f"{record.get('type', 'train')}/{k}", v, record["step"])

    def _check_finite(self, loss: float, norm: float) -> None:
        bad_norm = self.scaler is None and not math.isfinite(norm)
        if not math.isfinite(loss) or bad_norm:
            raise TrainingError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.step + 1} "
                f"(loss {loss}, grad norm {norm}, lr {self.lr:.3g}); stopped without writing a checkpoint. "
                f"Lower the learning rate, enable --clip-grad, or use --amp none; --resume restarts from the last "
                f"good checkpoint")

    def _train_step(self, batches: list) -> tuple:
        """One optimiser step over `accum_steps` micro-batches; returns (mean loss, grad norm, images, parts)."""
        keep = self._apply_schedules()
        loss_sum, images_seen, parts = torch.zeros((), device=self.device), 0, {}
        self.skipped_train += sum(int(b[2]) for b in batches)
        if not self.info.enabled:  # a micro-batch whose images were all undecodable has nothing to learn from
            batches = [b for b in batches if b[1].numel() > 0]
            if not batches:
                return self._skip_step(keep)
        for j, (images, labels, _) in enumerate(batches):
            if labels.numel() == 0:  # DDP: this rank still takes part in the gradient all-reduce, with zero loss
                images, labels = self._stand_in_batch()
                zero = True
            else:
                zero = False
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x, target = self.augment(images, labels)
            last = j == len(batches) - 1
            sync = self.net.no_sync() if (self.info.enabled and not last) else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    out = self.net(x, return_info=True) if self.needs_info else self.net(x)
                    loss = self.criterion(x, out, target)
                if zero:
                    loss = loss * 0.0
                scaled = loss / len(batches)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
            images_seen += 0 if zero else labels.numel()
            for k, v in getattr(self.criterion, "last_parts", {}).items():
                parts[k] = parts.get(k, 0.0) + float(v) / len(batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.step < self.freeze_steps and self.cfg.freeze_mode == "no_grad":
            for g in self.optimizer.param_groups:
                if g["part"] == "backbone":
                    for p in g["params"]:
                        p.grad = None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad or float("inf"))
        mean_loss = loss_sum.item() / len(batches)
        self._check_finite(mean_loss, float(norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return mean_loss, float(norm), images_seen, keep, parts

    def _skip_step(self, keep) -> tuple:
        """A step whose micro-batches were all undecodable: no update, the position and schedules move on."""
        self.empty_steps += 1
        if self.info.main:
            print(f"warning: step {self.step + 1}: every image of the batch was undecodable; step skipped "
                  f"(no update)")
        self.step += 1
        return float("nan"), 0.0, 0, keep, {}

    def _stand_in_batch(self) -> tuple:
        """One black image, label 0: what a rank with an empty micro-batch feeds DDP (its loss is multiplied by 0)."""
        S = self.cfg.img_size
        return torch.zeros(1, 3, S, S, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)

    def _epoch_batches(self):
        """Groups of `accum_steps` micro-batches from the current position of the current epoch."""
        accum = self.cfg.accum_steps
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.epoch, self.batch_in_epoch * accum)
        group = []
        for batch in self.train_loader:
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        error = None
        if info.main:  # rank 0 decides; every rank raises the same error instead of waiting on a barrier
            try:
                self.lock = RunLock(self.run_dir).acquire()
                existing = latest_checkpoint(self.run_dir)
                if existing is not None and not cfg.resume:
                    self.lock.release()
                    error = (f"{str(self.run_dir)!r} already holds a checkpoint ({existing.name}); pass --resume "
                             f"to continue it, or choose another --output")
            except TrainingError as e:
                error = str(e)
        error = D.broadcast_object(info, error)
        if error:
            raise TrainingError(error)
        try:
            return self._fit()
        finally:
            if self.lock:
                self.lock.release()
            if self.writer is not None:
                self.writer.close()

    def _fit(self) -> dict:
        cfg, info = self.cfg, self.info
        seed = cfg.seed + info.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if cfg.resume:
            self._resume()
        if info.main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                warnings.warn("--tensorboard needs the tensorboard package; logging to log.jsonl only")
        bar = None
        if info.main:
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", mininterval=1.0, dynamic_ncols=True)
        t_start, window_t, window_imgs, train_imgs, train_time = time.perf_counter(), time.perf_counter(), 0, 0, 0.0
        last_val = None
        self.net.train()
        self.criterion.train()
        while self.step < self.total_steps:
            for group in self._epoch_batches():
                t0 = time.perf_counter()
                loss, norm, n_img, keep, parts = self._train_step(group)
                self.batch_in_epoch += 1
                train_time += time.perf_counter() - t0
                n_img *= info.world
                window_imgs += n_img
                train_imgs += n_img
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f} lr {self.lr:.2e}" + (f" keep {keep:.2f}" if keep else "")
                                        + f" {window_imgs / max(time.perf_counter() - window_t, 1e-9):.1f} img/s",
                                        refresh=False)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    loss_avg = D.all_sum(info, [loss])[0] / info.world
                    rate = window_imgs / max(time.perf_counter() - window_t, 1e-9)
                    self._log({"type": "step", "step": self.step, "epoch": self.epoch, "loss": loss_avg,
                               "lr": self.lr, "keep_rate": keep, "grad_norm": norm, "img_per_s": rate, **parts})
                    window_t, window_imgs = time.perf_counter(), 0
                epoch_done = self.batch_in_epoch == 0
                if epoch_done and self.val_loader is not None and cfg.eval_every_epoch:
                    last_val = evaluate(self.model, self.val_loader, self.device, cfg.img_size, self.amp_dtype,
                                        info)
                    self._log({"type": "epoch", "step": self.step, "epoch": self.epoch, "train_loss": loss,
                               **{f"val_{k}": v for k, v in last_val.items()}})
                    if bar is not None:
                        top5 = f"{last_val['top5']:.2f}" if cfg.num_classes > 5 else "n/a"
                    bar.write(f"epoch {self.epoch}: val top-1 {last_val['top1']:.2f} top-5 {top5} loss "
                              f"{last_val['loss']:.3f}")
                if epoch_done or (cfg.save_every and self.step % cfg.save_every == 0) or \
                        self.step == self.total_steps:
                    self.save()
                if cfg.stop_after_step is not None and self.step == cfg.stop_after_step:
                    os._exit(137)  # testing: an abrupt kill right after a checkpoint
                if self.step >= self.total_steps:
                    break
        if bar is not None:
            bar.close()
        return self._finish(last_val, train_imgs / max(train_time, 1e-9), time.perf_counter() - t_start)

    def _finish(self, last_val: Optional[dict], train_rate: float, seconds: float) -> dict:
        cfg, info = self.cfg, self.info
        if self.val_loader is not None and (last_val is None or self.batch_in_epoch != 0):
            last_val = evaluate(self.model, self.val_loader, self.device, cfg.img_size, self.amp_dtype, info)
        ema_val = None
        if self.ema is not None and self.val_loader is not None:
            ema_model = _ema_copy(self.model, self.ema)
            ema_val = evaluate(ema_model, self.val_loader, self.device, cfg.img_size, self.amp_dtype, info)
        skipped_train, empty_steps = (int(v) for v in D.all_sum(info, [self.skipped_train, self.empty_steps]))
        summary = None
        if info.main:
            meta = {"step": self.step}
            if self.meta.get("classes"):
                meta["classes"] = json.dumps(list(self.meta["classes"]))
            save_checkpoint(self.model, self.run_dir / "model.safetensors", metadata=meta)
            if self.ema is not None:
                save_checkpoint(self.ema.state_dict(), self.run_dir / "model_ema.safetensors")
            numbers = model_numbers(self.model, cfg.img_size)
            summary = {**self.meta, "steps": self.step, "epochs": self.step / self.steps_per_epoch,
                       "top1": last_val["top1"] if last_val else None,
                       "top5": last_val["top5"] if last_val and cfg.num_classes > 5 else None,  # <= 5 classes: 100%
                       "val_loss": last_val["loss"] if last_val else None,
                       "ema_top1": ema_val["top1"] if ema_val else None, **numbers,
                       "img_per_s": throughput(self.model, self.device, cfg.img_size, amp_dtype=self.amp_dtype),
                       "train_img_per_s": train_rate, "seconds": seconds, "world_size": info.world,
                       "global_batch": cfg.batch_size * info.world * cfg.accum_steps,
                       "skipped_images": skipped_train + (last_val["skipped"] if last_val else 0),
                       "skipped_train_images": skipped_train,  # counted each time a bad image is read
                       "skipped_val_images": last_val["skipped"] if last_val else 0,
                       "skipped_steps": empty_steps}
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.run_dir / "summary.json")
        D.barrier(info)
        return summary


def check_config(cfg: TrainConfig) -> None:
    """Counts and rates a run cannot work with are ConfigErrors naming the value (not a silent default)."""
    def bad(name, value, rule):
        raise ConfigError(f"{name} must be {rule}, got {value!r}")

    if cfg.max_steps is not None and (not isinstance(cfg.max_steps, int) or cfg.max_steps < 1):
        bad("max_steps (--max-steps)", cfg.max_steps, "an integer >= 1")
    if cfg.max_steps is None and not (isinstance(cfg.epochs, (int, float)) and cfg.epochs > 0
                                      and math.isfinite(cfg.epochs)):
        bad("epochs (--epochs)", cfg.epochs, "> 0")
    for name, value in (("batch_size (--batch-size)", cfg.batch_size), ("accum_steps (--accum-steps)",
                                                                         cfg.accum_steps)):
        if not isinstance(value, int) or value < 1:
            bad(name, value, "an integer >= 1")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr (--lr)", cfg.lr, "> 0")
    if cfg.min_lr < 0 or cfg.warmup_epochs < 0 or cfg.weight_decay < 0 or cfg.freeze_backbone_epochs < 0:
        bad("min_lr / warmup_epochs / weight_decay / freeze_backbone_epochs",
            (cfg.min_lr, cfg.warmup_epochs, cfg.weight_decay, cfg.freeze_backbone_epochs), ">= 0")
    if not 0 <= cfg.ema_decay < 1:
        bad("ema_decay (--ema-decay)", cfg.ema_decay, "in [0, 1)")
    if cfg.workers is not None and cfg.workers < 0:
        bad("workers (--workers)", cfg.workers, ">= 0")


def _ema_copy(model: nn.Module, ema: ModelEma) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(ema.state_dict())
    return m
