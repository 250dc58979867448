"""`dynavit eval --model M [--method X ...] --checkpoint C --data DIR|demo`: top-1 / top-5, GMACs, img/s.

Works under torchrun too (each process evaluates its shard; counts are summed, nothing is padded).
"""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_model_args, model_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a folder or the demo dataset")
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors / .pth, or a run directory); "
                   "omit to evaluate the freshly initialised model")
    p.add_argument("--data", required=True, help="ImageNet-style folder or 'demo'")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--amp", default="none", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--demo-size", type=int, default=None, help="number of demo images (default 1000)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def resolve_checkpoint(path: str) -> Path:
    """A file, or a run directory (its model.safetensors)."""
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() and (p / "model.safetensors").exists() else p


def run(args) -> int:
    from ..checkpoint import load_checkpoint
    from ..data import build_dataset, make_loader
    from ..registry import create_model
    from ..train import dist as D
    from ..train.engine import resolve_amp
    from ..train.evaluate import evaluate, model_numbers, throughput

    info = D.setup(args.device)
    try:
        kw = model_kwargs(args)
        if args.data != "demo" and "num_classes" not in kw:
            from ..data.folder import scan_folder

            root = Path(args.data)
            classes, _ = scan_folder(root / "train" if (root / "train").is_dir() else root / args.split)
            kw["num_classes"] = len(classes)
        elif args.data == "demo":
            kw.setdefault("num_classes", 10)
        model = create_model(args.model, method=args.method, **kw)
        if args.checkpoint:
            load_checkpoint(model, resolve_checkpoint(args.checkpoint))
        model = model.to(info.device).eval()
        img_size = getattr(model, "img_size", 224)
        dataset = build_dataset(args.data, args.split, img_size, train=False, demo_size=args.demo_size)
        loader = make_loader(dataset, args.batch_size, False, info.rank, info.world, 0, args.workers)
        amp = resolve_amp(args.amp, info.device)
        res = evaluate(model, loader, info.device, img_size, amp, info, progress=True)
        if info.main:
            res.update(model_numbers(model, img_size))
            res["img_per_s"] = throughput(model, info.device, img_size, amp_dtype=amp)
            res.update({"model": args.model, "method": args.method or "dense", "checkpoint": args.checkpoint,
                        "data": args.data, "split": args.split})
            gm = f"{res['gmacs']:.3f}" if res["gmacs"] is not None else "n/a"
            print(f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  loss {res['loss']:.4f}  "
                  f"images {res['images']}" + (f" (skipped {res['skipped']} undecodable)" if res["skipped"] else "")
                  + f"  GMACs {gm}  params {res['params'] / 1e6:.2f} M  {res['img_per_s']:.1f} img/s")
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        D.teardown(info)
    return 0
