"""`dynavit demo`: the main job on the embedded default.

Until the shipped demo models land (issue 8), the demo builds DeiT-S, attaches every registered method at keep
rate 0.7 (ToMe r=13), runs each on a random image batch and prints tokens per stage, GMACs and a side-by-side
throughput measurement; the trained demo replaces the random input with the embedded digits dataset.
"""
from __future__ import annotations

import time

import torch

DEFAULT_SPECS = {"dynamicvit": {"keep_rate": 0.7}, "evit": {"keep_rate": 0.7}, "bat": {"keep_rate": 0.7},
                 "tome": {"r": 13}}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: build, reduce and measure every method")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="one timed batch per model")
    p.add_argument("--output", default=None, help="(reserved for the trained demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..flops import count_gmacs
    from ..registry import create_model, list_methods

    torch.manual_seed(0)
    available = list_methods()
    rows = [("dense", None, {})] + [(m, m, kw) for m, kw in DEFAULT_SPECS.items() if m in available]
    x = torch.randn(args.batch_size, 3, 224, 224)
    repeats = 1 if args.quick else 3
    dense_rate = None
    print(f"{'method':<12}{'tokens per stage':<28}{'GMACs':>7}{'img/s':>9}{'speed-up':>10}")
    for label, method, kw in rows:
        model = create_model(args.model, method=method, **kw).eval()
        with torch.inference_mode():
            _, info = model(x[:1], return_info=True)
            model(x)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        rate = args.batch_size / sorted(times)[len(times) // 2]
        dense_rate = dense_rate or rate
        counts = info.token_counts
        stages = "/".join(str(c) for c in counts[:6]) + ("/..." if len(counts) > 6 else "") if counts else "196"
        print(f"{label:<12}{stages:<28}{count_gmacs(model):>7.2f}{rate:>9.1f}{rate / dense_rate:>9.2f}x")
    return 0
