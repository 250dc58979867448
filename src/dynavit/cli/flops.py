"""`dynavit flops --model M [--method X --keep-rate R | --r R | --budget B | --set K=V]`: GMACs per image, per
stage and in total.

Counts the eval forward actually executed (tokens really kept, predictor / clustering / matching included) with
`torch.utils.flop_counter` under the math attention backend (fused CPU attention counts as 0 otherwise).
"""
from __future__ import annotations

import json

import torch

from ..flops import flops_breakdown
from ._common import add_model_args, build_model, label


def add_parser(sub) -> None:
    p = sub.add_parser("flops", help="GMACs per image of the executed inference path, per stage and in total")
    add_model_args(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write the breakdown as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    torch.manual_seed(0)
    model = build_model(args).eval()
    report = flops_breakdown(model)
    report = {"model": args.model, "method": args.method or "dense",
              "img_size": getattr(model, "img_size", None), **report}
    print(f"{label(args)}: {report['gmacs']:.3f} GMACs per image")
    if report["stages"]:
        print("| blocks | tokens in | GMACs |\n|---|---|---|")
        for s in report["stages"]:
            a, b = s["blocks"]
            print(f"| {a}-{b} | {s['tokens']} | {s['gmacs']:.4f} |")
    other = [p for p in report["parts"] if not p["name"].startswith("blocks.")]
    if other:
        print("| other part | GMACs |\n|---|---|")
        for p in other:
            print(f"| {p['name']} | {p['gmacs']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
