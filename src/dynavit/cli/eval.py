"""`dynavit eval --model M [--method X ...] --checkpoint C --data DIR|demo`: top-1 / top-5, GMACs, img/s.

Works under torchrun too (each process evaluates its shard; counts are summed, nothing is padded).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..extras import require
from ._common import add_model_args, number
from ._weights import add_weights_args


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a folder or the demo dataset")
    add_model_args(p, model_required=False)
    add_weights_args(p)
    p.add_argument("--data", required=True, help="ImageNet-style folder or 'demo'")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default val)")
    p.add_argument("--batch-size", type=number(int, ">0"), default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=number(int, ">=0"), default=None)
    p.add_argument("--amp", default="none", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--demo-size", type=number(int, ">0"), default=None, help="number of demo images (default 1000)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def resolve_checkpoint(path: str) -> Path:
    """A file, or a run directory (its model.safetensors). Kept for callers; the CLI uses `_weights`."""
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() and (p / "model.safetensors").exists() else p


def split_folder(data: str, split: str) -> Path:
    """The folder to evaluate: DATA/SPLIT, or DATA itself when it is a split folder (said in a note)."""
    from ..errors import DataError

    root = Path(data)
    if (root / split).is_dir():
        return root / split
    if not root.is_dir():
        from ..errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"data folder not found: {data!r}")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split != "val" or "train" in present:
        raise DataError(f"no {split!r} folder in {data!r} (found: {', '.join(present) or 'nothing'}); pass --split "
                        f"NAME or the split folder itself")
    print(f"note: no {data}/{split}: evaluating the class folders of {data!r} itself ({len(present)} classes)")
    return root


def run(args) -> int:
    from ..data import build_dataset, make_loader
    from ..errors import DataError
    from ..registry import create_model
    from ..train import dist as D
    from ..train.engine import resolve_amp
    from ..train.evaluate import evaluate, model_numbers, throughput
    from ._weights import checkpoint_classes, load_weights, model_for, resolve_weights

    if args.data == "demo":
        require("train", "the demo dataset", ("sklearn", "skimage"))
    info = D.setup(args.device)
    try:
        w = resolve_weights(args.checkpoint) if args.checkpoint else None
        name, method, kw = model_for(args, w)
        n_ckpt = checkpoint_classes(w) if w is not None else None
        classes = w.classes if w is not None else None
        folder = None
        if args.data == "demo":
            n_data = 10
        else:
            from ..data.folder import scan_folder

            folder = split_folder(args.data, args.split)
            found, _ = scan_folder(folder)
            root = Path(args.data)
            train_classes = scan_folder(root / "train")[0] if (root / "train").is_dir() else found
            classes = classes or train_classes
            n_data = len(classes)
        if "num_classes" not in kw:
            kw["num_classes"] = n_ckpt or n_data
        if n_ckpt is not None and n_ckpt != n_data and args.num_classes is None:
            raise DataError(f"{w.label!r} has {n_ckpt} classes but the data {args.data!r} has {n_data}: evaluate "
                            f"on data with the checkpoint's classes")
        model = create_model(name, method=method, **kw)
        if w is not None:
            load_weights(model, w, partial=args.allow_partial, log=print if info.main else (lambda _: None))
        model = model.to(info.device).eval()
        img_size = getattr(model, "img_size", 224)
        dataset = build_dataset(args.data, args.split, img_size, train=False, demo_size=args.demo_size,
                                classes=classes if folder is not None else None)
        loader = make_loader(dataset, args.batch_size, False, info.rank, info.world, 0, args.workers)
        amp = resolve_amp(args.amp, info.device)
        res = evaluate(model, loader, info.device, img_size, amp, info, progress=True)
        if info.main:
            res.update(model_numbers(model, img_size))
            res["img_per_s"] = throughput(model, info.device, img_size, amp_dtype=amp)
            res.update({"model": name, "method": method or "dense", "checkpoint": args.checkpoint,
                        "data": args.data, "split": args.split, "num_classes": kw["num_classes"]})
            if kw["num_classes"] <= 5:
                res["top5"] = None  # always 100% with <= 5 classes: omitted
            gm = f"{res['gmacs']:.3f}" if res["gmacs"] is not None else "n/a"
            top5 = f"{res['top5']:.2f}" if res["top5"] is not None else f"n/a ({kw['num_classes']} classes)"
            print(f"top-1 {res['top1']:.2f}  top-5 {top5}  loss {res['loss']:.4f}  "
                  f"images {res['images']}" + (f" (skipped {res['skipped']} undecodable)" if res["skipped"] else "")
                  + f"  GMACs {gm}  params {res['params'] / 1e6:.2f} M  {res['img_per_s']:.1f} img/s")
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
                print(f"wrote {args.json}")
        D.barrier(info)  # every rank done before the group is destroyed
    finally:
        D.teardown(info)
    return 0
