"""`dynavit train --model M [--method X ...] --data DIR|demo --output RUN_DIR [--epochs E | --max-steps S]`.

Runs alone or under `torchrun --nproc_per_node N -m dynavit train ...` (DDP; NCCL on GPUs, gloo on CPU).
`--batch-size` is per process; the recipe's learning rate is scaled to the global batch and the rule printed.
"""
from __future__ import annotations

import argparse

from ._common import add_model_args, model_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a (token-reduced) model; resumable, DDP-ready")
    add_model_args(p)
    p.add_argument("--data", required=True, help="ImageNet-style folder (DIR/train/<class>/..., DIR/val/...) or "
                   "'demo' (the embedded digits dataset)")
    p.add_argument("--output", required=True, help="run directory (checkpoints, log.jsonl, summary.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help="epochs (default: the recipe's)")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps instead of epochs")
    p.add_argument("--recipe", default=None, help="dense | finetune | dynamicvit | evit | bat | tome | dit "
                   "(default: from --method)")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per micro-batch (default 64)")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", "--finetune", dest="init", default=None, metavar="CHECKPOINT",
                   help="weights to start from (what fits is loaded: a dense checkpoint into a method's model)")
    p.add_argument("--lr", type=float, default=None, help="peak lr at the recipe's reference batch (scaled)")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None, help="max global gradient norm")
    p.add_argument("--freeze-backbone-epochs", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None, help="model EMA decay (0 = off)")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision (auto: bf16 / fp16 on CUDA, off on CPU)")
    p.add_argument("--aug", default=None, choices=["deit", "light", "none"], help="augmentation preset")
    p.add_argument("--mixup", type=float, default=None)
    p.add_argument("--cutmix", type=float, default=None)
    p.add_argument("--smoothing", type=float, default=None)
    p.add_argument("--no-distill", action="store_true", help="DynamicViT: no teacher distillation")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log.jsonl line every N steps")
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch validation")
    p.add_argument("--demo-size", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
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


def _load_init(model, path, main: bool) -> None:
    from ..checkpoint import load_checkpoint

    report = load_checkpoint(model, path, strict=False)
    if main:
        print(f"init: loaded {path}" + (f" ({'; '.join(report.converted)})" if report.converted else ""))
        if report.missing:
            print(f"  newly initialised ({len(report.missing)}): {', '.join(report.missing[:8])}"
                  + (" ..." if len(report.missing) > 8 else ""))
        for key, a, b in report.mismatched:
            print(f"  not loaded (shape {a} in checkpoint, {b} in model): {key}")
        if report.unexpected:
            print(f"  ignored ({len(report.unexpected)}): {', '.join(report.unexpected[:8])}")


def run(args) -> int:
    import json

    from ..data import build_dataset
    from ..data.folder import scan_folder
    from ..registry import create_model
    from ..train import dist as D
    from ..train.criterion import build_criterion
    from ..train.engine import Trainer, TrainConfig
    from ..train.recipes import get_recipe

    info = D.setup(args.device)
    try:
        import torch

        torch.manual_seed(args.seed)  # the initial weights: same on every rank and in every run with this seed
        recipe = get_recipe(args.recipe, args.method, args.model)
        if args.data == "demo":
            classes = [str(c) for c in range(10)]
        else:
            from pathlib import Path

            root = Path(args.data)
            classes, _ = scan_folder(root / "train" if (root / "train").is_dir() else root)
        kw = model_kwargs(args)
        kw.setdefault("num_classes", len(classes))
        model = create_model(args.model, method=args.method, **kw)
        img_size = getattr(model, "img_size", 224)
        if args.init:
            _load_init(model, args.init, info.main)
        demo_train, demo_val = args.demo_size or (None, None)
        train_set = build_dataset(args.data, "train", img_size, train=True, demo_size=demo_train,
                                  demo_cache=args.demo_cache)
        val_set = None
        if not args.no_eval:
            val_set = build_dataset(args.data, "val", img_size, train=False, classes=getattr(train_set, "classes",
                                                                                           None), demo_size=demo_val,
                                    demo_cache=args.demo_cache)
        aug = _augment_config(args, recipe)
        criterion = build_criterion(model, recipe.criterion, smoothing=aug.smoothing,
                                    distill=recipe.distill and not args.no_distill, budget=args.budget,
                                    budget_start=recipe.budget_start)
        global_batch = args.batch_size * info.world * args.accum_steps
        lr, rule = recipe.scaled_lr(global_batch, args.lr)
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
            backbone_lr_scale=recipe.backbone_lr_scale, head_patterns=recipe.head_patterns,
            frozen_patterns=recipe.frozen_patterns,
            freeze_backbone_epochs=pick(args.freeze_backbone_epochs, recipe.freeze_backbone_epochs),
            ema_decay=pick(args.ema_decay, recipe.ema_decay), amp=args.amp, seed=args.seed, img_size=img_size,
            num_classes=len(classes), augment=aug, keep_rate=keep,
            keep_schedule=recipe.keep_schedule if keep is not None else None, workers=args.workers,
            save_every=args.save_every, log_every=args.log_every, resume=args.resume,
            find_unused_parameters=recipe.criterion == "budget", tensorboard=args.tensorboard,
            stop_after_step=args.stop_after_step)
        meta = {"model": args.model, "method": args.method or "dense", "recipe": recipe.name,
                "keep_rate": keep, "data": args.data, "num_classes": len(classes), "img_size": img_size}
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
    finally:
        D.teardown(info)
    return 0
