"""`dynavit train --model M [--method X ...] --data DIR|demo --output RUN_DIR [--epochs E | --max-steps S]`.

Runs alone or under `torchrun --nproc_per_node N -m dynavit train ...` (DDP; NCCL on GPUs, gloo on CPU).
`--batch-size` is per process; the recipe's learning rate is scaled to the global batch and the rule printed.
"""
from __future__ import annotations

import argparse

from ..extras import require
from ._common import add_model_args, model_kwargs, number
from ._weights import PARTIAL_FLAG


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a (token-reduced) model; resumable, DDP-ready")
    add_model_args(p)
    p.add_argument("--data", required=True, help="ImageNet-style folder (DIR/train/<class>/..., DIR/val/...) or "
                   "'demo' (the embedded digits dataset)")
    p.add_argument("--output", required=True, help="run directory (checkpoints, log.jsonl, summary.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=number(float, ">0"), default=None, help="epochs (default: the recipe's)")
    g.add_argument("--max-steps", type=number(int, ">=1"), default=None, help="optimiser steps instead of epochs")
    p.add_argument("--recipe", default=None, help="a recipe listed by `dynavit models` (default: the method's "
                   "or the model family's own, else finetune / dense)")
    p.add_argument("--batch-size", type=number(int, ">=1"), default=64,
                   help="images per process per micro-batch (default 64)")
    p.add_argument("--accum-steps", type=number(int, ">=1"), default=1,
                   help="gradient accumulation micro-batches per step")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--extend", action="store_true", help="with --resume: train a finished (or interrupted) run to "
                   "a new --epochs / --max-steps; the lr and keep-rate schedules are recomputed for the new length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", "--finetune", dest="init", default=None, metavar="CHECKPOINT",
                   help="weights to start from: a file, a run directory or a shipped asset name. Every backbone "
                   "weight must load (a dense checkpoint into a method's model: the method's new parts start fresh; "
                   "a classifier of another size is re-initialised)")
    p.add_argument(PARTIAL_FLAG, action="store_true", help="with --init: load what fits and leave the rest at "
                   "its initial values (otherwise unloaded backbone weights are an error)")
    p.add_argument("--lr", type=number(float, ">0"), default=None,
                   help="peak lr at the recipe's reference batch (scaled by global batch / reference batch)")
    p.add_argument("--no-lr-scale", action="store_true", help="use --lr (or the recipe's lr) as given, unscaled")
    p.add_argument("--min-lr", type=number(float, ">=0"), default=None)
    p.add_argument("--warmup-epochs", type=number(float, ">=0"), default=None)
    p.add_argument("--warmup-start", type=number(float, ">=0"), default=None, help="lr of the first warm-up step "
                   "(default: the recipe's; 1e-6, DynamicViT 0)")
    p.add_argument("--warmup-style", default=None, choices=["linear", "linspace"],
                   help="warm-up ramp: linear (start + (lr - start) step / W) or linspace (np.linspace(start, lr, W), "
                   "the DynamicViT release; default: the recipe's)")
    p.add_argument("--weight-decay", type=number(float, ">=0"), default=None)
    p.add_argument("--clip-grad", type=number(float, ">0"), default=None, help="max global gradient norm")
    p.add_argument("--freeze-backbone-epochs", type=number(float, ">=0"), default=None)
    p.add_argument("--freeze-mode", default=None, choices=["no_grad", "zero_lr"],
                   help="how the frozen backbone is held: no_grad (gradients dropped) or zero_lr (lr 0, AdamW moments "
                   "still advance, the DynamicViT release; default: the recipe's)")
    p.add_argument("--ema-decay", type=number(float, ">=0"), default=None, help="model EMA decay in [0, 1) (0 = off)")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision (auto: bf16 / fp16 on CUDA, off on CPU)")
    p.add_argument("--aug", default=None, choices=["deit", "light", "none"], help="augmentation preset")
    p.add_argument("--mixup", type=number(float, ">=0"), default=None)
    p.add_argument("--cutmix", type=number(float, ">=0"), default=None)
    p.add_argument("--smoothing", type=number(float, ">=0"), default=None)
    p.add_argument("--no-distill", action="store_true", help="no teacher distillation (for criteria that have one)")
    p.add_argument("--backbone-lr-scale", type=number(float, ">=0"), default=None,
                   help="the backbone's lr as a fraction of --lr (default: the recipe's; e.g. DynamicViT 0.01, DiT 0.05)")
    p.add_argument("--ratio-weight", type=number(float, ">0"), default=None,
                   help="DynamicViT: weight of the keep-ratio loss (default: the authors' 2, 5 for DeiT-B; "
                        "docs/dynamicvit.md 'Short runs')")
    p.add_argument("--token-teacher", default=None, metavar="WEIGHTS",
                   help="token labelling (LV-ViT): a run directory or shipped asset whose model gives per-token scores "
                        "(e.g. demo_cnn); the model needs a token head on the same grid (pvt_v2_*: --set "
                        "token_head_scale=1)")
    p.add_argument("--token-weight", type=number(float, ">0"), default=0.5,
                   help="weight of the token-label loss (LV-ViT's 0.5)")
    p.add_argument("--workers", type=number(int, ">=0"), default=None, help="DataLoader workers per process")
    p.add_argument("--save-every", type=number(int, ">=0"), default=0, help="also checkpoint every N steps")
    p.add_argument("--log-every", type=number(int, ">=1"), default=10, help="log.jsonl line every N steps")
    p.add_argument("--no-eval", action="store_true", help="no validation (also: train on a folder without val/)")
    p.add_argument("--demo-size", type=number(int, ">=1"), nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="demo dataset sizes (default 5000 1000)")
    p.add_argument("--demo-cache", action="store_true", help="render the demo once into ~/.cache/dynavit "
                   "(about 150 KB per image; worth it when the model is faster than the renderer, e.g. on a GPU)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to RUN_DIR/tb")
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _augment_config(args, recipe):
    from dataclasses import replace

    from ..data.transforms import AugmentConfig

    preset = args.aug or recipe.augment
    cfg = {"deit": AugmentConfig(), "light": AugmentConfig.light(), "none": AugmentConfig.none()}[preset]
    changes = {k: getattr(args, k) for k in ("mixup", "cutmix", "smoothing") if getattr(args, k) is not None}
    return replace(cfg, **changes)


def check_output_dir(path: str) -> None:
    """--output must be a folder this process can create and write to (one line otherwise, before any work)."""
    import os
    from pathlib import Path

    from ..errors import OutputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {path!r} is a file, not a run directory; choose a folder name")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --output {path!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to --output {path!r}: permission denied (choose another folder)")


def data_splits(data: str, no_eval: bool) -> tuple:
    """(train folder, val folder or None) of `--data`, or a DataError saying what was found and what to pass."""
    from pathlib import Path

    from ..errors import CheckpointNotFoundError, DataError

    root = Path(data)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"data folder not found: {data!r} (expected {data}/train/<class>/... and "
                                      f"{data}/val/<class>/..., or 'demo')")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / "train").is_dir():
        if (root / "val").is_dir():
            return root / "train", (None if no_eval else root / "val")
        if no_eval:
            return root / "train", None
        raise DataError(f"{data!r} has train/ but no val/ (found: {', '.join(present)}): add {data}/val/<class>/... "
                        f"or pass --no-eval to train without validation")
    if (root / "val").is_dir():
        raise DataError(f"{data!r} has val/ but no train/ (found: {', '.join(present)}): training needs "
                        f"{data}/train/<class>/...")
    if no_eval:
        print(f"note: {data!r} has no train/ split: training on its class folders ({len(present)}), no validation")
        return root, None
    raise DataError(f"{data!r} has no train/ and val/ split (found: {', '.join(present[:8]) or 'nothing'}"
                    f"{', ...' if len(present) > 8 else ''}): arrange {data}/train/<class>/... and "
                    f"{data}/val/<class>/..., or pass --no-eval to train on its class folders without validation")


def learning_rate(args, recipe, global_batch: int, main: bool) -> tuple:
    """(lr, the rule as printed): scaled by global batch / the recipe's reference batch unless --no-lr-scale."""
    base = recipe.lr if args.lr is None else args.lr
    if args.no_lr_scale:
        return base, f"lr = {base:g} (--no-lr-scale: not scaled by the global batch {global_batch})"
    lr, rule = recipe.scaled_lr(global_batch, args.lr)
    if main and global_batch * 8 <= recipe.lr_batch:
        rule += (f"\nnote: the global batch {global_batch} is {recipe.lr_batch / global_batch:g}x smaller than the "
                 f"recipe's reference {recipe.lr_batch}, so the lr is scaled down to {lr:.3g}; pass --no-lr-scale to "
                 f"use {base:g} as given")
    return lr, rule


def token_label_criterion(base, spec: str, weight: float, log=print):
    """`--token-teacher`: the frozen teacher built from a run directory / asset (they name their model)."""
    from ..errors import ConfigError
    from ..registry import create_model
    from ..train.criterion import TokenLabelCriterion
    from ._weights import load_weights, resolve_weights

    w = resolve_weights(spec)
    if not w.model:
        raise ConfigError(f"--token-teacher {spec!r}: give a run directory or a shipped asset (a bare weights file "
                          f"does not say which model it is)")
    teacher = create_model(w.model, **w.kwargs)
    load_weights(teacher, w, purpose="checkpoint", log=log)
    log(f"token labels from {spec} ({w.model}), weight {weight:g}")
    return TokenLabelCriterion(base, teacher, weight)


def run(args) -> int:
    import json

    from ..data import build_dataset
    from ..data.folder import scan_folder
    from ..recipes import get_recipe
    from ..registry import create_model, spec_for
    from ..train import dist as D
    from ..train.criterion import build_criterion
    from ..train.engine import Trainer, TrainConfig

    if args.extend and not args.resume:
        from ..errors import ConfigError

        raise ConfigError("--extend continues an existing run: use it with --resume")
    if args.ema_decay is not None and args.ema_decay >= 1:
        from ..errors import ConfigError

        raise ConfigError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.ratio_weight is not None and args.method != "dynamicvit":
        from ..errors import ConfigError

        raise ConfigError(f"--ratio-weight is DynamicViT's keep-ratio loss weight; --method is {args.method!r}")
    recipe = get_recipe(args.recipe, args.method, args.model)
    if args.data == "demo":
        require("train", "the demo dataset", ("sklearn", "skimage"))
    if _augment_config(args, recipe).needs_kornia:
        require("train", f"dynavit train --aug {args.aug or recipe.augment} (kornia's batched augmentation; "
                "--aug none needs none)", ("kornia",))
    check_output_dir(args.output)
    info = D.setup(args.device)
    try:
        import torch

        torch.manual_seed(args.seed)  # the initial weights: same on every rank and in every run with this seed
        spec = spec_for(args.model, args.method)
        if args.data == "demo":
            classes = [str(c) for c in range(10)]
            train_dir, val_dir = "demo", (None if args.no_eval else "demo")
        else:
            train_dir, val_dir = data_splits(args.data, args.no_eval)
            classes, _ = scan_folder(train_dir)
        kw = model_kwargs(args)
        kw.setdefault("num_classes", len(classes))
        model = create_model(args.model, method=args.method, **kw)
        img_size = getattr(model, "img_size", 224)
        if args.init:
            from ._weights import load_weights, resolve_weights

            load_weights(model, resolve_weights(args.init), purpose="init", partial=args.allow_partial,
                         log=print if info.main else (lambda _: None))
        demo_train, demo_val = args.demo_size or (None, None)
        aug = _augment_config(args, recipe)
        train_set = build_dataset(str(train_dir), "train", img_size, train=True, demo_size=demo_train,
                                  demo_cache=args.demo_cache,
                                  random_crop=(aug.scale, aug.ratio) if aug.random_crop else None,
                                  crop_seed=args.seed)
        val_set = None
        if val_dir is not None:
            val_set = build_dataset(str(val_dir), "val", img_size, train=False, classes=getattr(train_set, "classes",
                                                                                              None),
                                    demo_size=demo_val, demo_cache=args.demo_cache)
        options = {} if args.ratio_weight is None else {"ratio_weight": args.ratio_weight}
        criterion = build_criterion(model, spec.criterion if spec else None, smoothing=aug.smoothing,
                                    distill=recipe.distill and not args.no_distill, **options)
        if args.token_teacher:
            criterion = token_label_criterion(criterion, args.token_teacher, args.token_weight,
                                              log=print if info.main else (lambda _: None))
        global_batch = args.batch_size * info.world * args.accum_steps
        lr, rule = learning_rate(args, recipe, global_batch, info.main)
        reducer = getattr(model, "reducer", None)
        keep = args.keep_rate
        if keep is None and reducer is not None and len(set(getattr(reducer, "keep_rates", ()))) == 1:
            keep = reducer.keep_rates[0]
        pick = lambda a, r: r if a is None else a  # noqa: E731
        cfg = TrainConfig(
            output=args.output, epochs=pick(args.epochs, recipe.epochs), max_steps=args.max_steps,
            batch_size=args.batch_size, accum_steps=args.accum_steps, lr=lr,
            min_lr=min(pick(args.min_lr, recipe.min_lr), lr), warmup_epochs=pick(args.warmup_epochs,
                                                                                 recipe.warmup_epochs),
            weight_decay=pick(args.weight_decay, recipe.weight_decay), clip_grad=pick(args.clip_grad,
                                                                                      recipe.clip_grad),
            backbone_lr_scale=pick(args.backbone_lr_scale, recipe.backbone_lr_scale), head_patterns=recipe.head_patterns,
            frozen_patterns=recipe.frozen_patterns,
            freeze_backbone_epochs=pick(args.freeze_backbone_epochs, recipe.freeze_backbone_epochs),
            freeze_mode=pick(args.freeze_mode, recipe.freeze_mode),
            warmup_start=pick(args.warmup_start, recipe.warmup_start),
            warmup_style=pick(args.warmup_style, recipe.warmup_style),
            ema_decay=pick(args.ema_decay, recipe.ema_decay), amp=args.amp, seed=args.seed, img_size=img_size,
            num_classes=len(classes), augment=aug, keep_rate=keep,
            keep_schedule=recipe.keep_schedule if keep is not None else None, workers=args.workers,
            save_every=args.save_every, log_every=args.log_every, resume=args.resume, extend=args.extend,
            find_unused_parameters=recipe.find_unused_parameters, tensorboard=args.tensorboard,
            stop_after_step=args.stop_after_step)
        method_params = spec.params if args.method not in (None, "dense") else ()
        meta = {"model": args.model, "method": args.method or "dense", "recipe": recipe.name,
                "keep_rate": keep, "data": args.data, "num_classes": len(classes), "img_size": img_size,
                "model_kwargs": {k: v for k, v in kw.items() if k not in method_params and k != "pretrained"},
                "method_kwargs": {k: v for k, v in kw.items() if k in method_params},
                "classes": list(getattr(train_set, "classes", None) or classes)}
        trainer = Trainer(model, criterion, train_set, val_set, cfg, info, meta)
        if info.main:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"model {args.model}" + (f" + {args.method}" if args.method else " (dense)")
                  + f", {params:.2f} M params, {img_size}px, {len(classes)} classes; recipe {recipe.name!r}")
            print(f"data {args.data}: {len(train_set)} train / {len(val_set) if val_set else 0} val images; "
                  f"{trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch) on {info.world} process(es), "
                  f"device {info.device}, amp {cfg.amp if trainer.amp_dtype else 'off'}")
            print(rule)
        summary = trainer.fit()
        if info.main:
            print(json.dumps({k: summary[k] for k in ("top1", "top5", "gmacs", "params", "img_per_s", "steps")},
                             default=str))
            print(f"wrote {args.output}/model.safetensors, log.jsonl, summary.json")
        D.barrier(info)  # every rank done before the group is destroyed (gloo aborted a rank still tearing down)
    finally:
        D.teardown(info)
    return 0
