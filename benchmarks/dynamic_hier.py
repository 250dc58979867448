"""DynamicCNN / DynamicSwin against their dense backbones: counted GMACs and wall-clock, side by side.

For each backbone the dense model and the method model (same backbone weights, random predictors and fast paths:
at inference the cost does not depend on which positions are picked, only on how many) are timed in interleaved
rounds (median of `--repeats`), twice: the whole forward, and stage 3 alone (where all the savings are; the
other stages are identical code). Reported: GMACs, the ideal speed-up dense / method GMACs, and the measured
wall-clock and process-CPU-time speed-ups (CPU time is robust to a busy shared machine at one thread).

    .venv/bin/python benchmarks/dynamic_hier.py --batch 8 --threads 1 --repeats 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from dynavit.timing import reexec_with_malloc_tunables  # noqa: E402

if "--no-reexec" not in sys.argv:  # docs/methods.md section 8: malloc page faults otherwise add 10-35% noise
    reexec_with_malloc_tunables(sys.argv)

import torch  # noqa: E402

import dynavit  # noqa: E402
from dynavit.bench import time_interleaved  # noqa: E402
from dynavit.flops import count_gmacs  # noqa: E402
from dynavit.hier import MapContext  # noqa: E402

PAIRS = {"convnext_tiny": "dynamiccnn", "convnext_small": "dynamiccnn", "convnext_base": "dynamiccnn",
         "swin_tiny_patch4_window7_224": "dynamicswin", "swin_small_patch4_window7_224": "dynamicswin",
         "swin_base_patch4_window7_224": "dynamicswin"}


def stage_input(model, x):
    """The map entering stage 3 (after its downsampling), computed by the dense model."""
    with torch.inference_mode():
        if model.family == "convnext":
            for s in range(2):
                x = model.run_stage(s, model.downsample_layers[s](x))
            return model.downsample_layers[2](x)
        x = model.embed(x)
        for s in range(2):
            x = model.layers[s].downsample(model.run_stage(s, x))
        return x


def counted_gmacs(step) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        step()
    return counter.get_total_flops() / 2e9


def measure(name: str, keep_rate: float, batch: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    dense = dynavit.create_model(name).eval()
    method = dynavit.create_model(name, method=PAIRS[name], keep_rate=keep_rate).eval()
    method.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randn(batch, 3, 224, 224)
    g_dense, g_method = count_gmacs(dense, x[:1]), count_gmacs(method, x[:1])
    x3 = stage_input(dense, x)

    def whole(model):
        def step():
            with torch.inference_mode():
                model(x)
        return step

    def stage3(model):
        def step():
            with torch.inference_mode():
                if model.reducer is None:
                    model.run_stage(2, x3)
                else:
                    model.reducer.run_stage(model, 2, x3, MapContext())
        return step

    s3 = [counted_gmacs(stage3(m)) / batch for m in (dense, method)]
    out = {"model": name, "method": f"{PAIRS[name]}:{keep_rate}", "batch": batch, "gmacs_dense": g_dense,
           "gmacs_method": g_method, "ideal": g_dense / g_method,
           "stage3_gmacs_dense": s3[0], "stage3_gmacs_method": s3[1], "stage3_ideal": s3[0] / s3[1]}
    for part, make in (("whole", whole), ("stage3", stage3)):
        cpu: list = []
        wall = time_interleaved([make(dense), make(method)], repeats, warmup, torch.device("cpu"), cpu_times=cpu)
        out[f"{part}_wall"] = statistics.median(a / b for a, b in zip(wall[0], wall[1]))
        out[f"{part}_cpu"] = statistics.median(a / b for a, b in zip(cpu[0], cpu[1]))
        out[f"{part}_dense_s"] = statistics.median(wall[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "swin_tiny_patch4_window7_224"],
                   choices=sorted(PAIRS))
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.keep_rate, args.batch, args.repeats, args.warmup) for m in args.models]
    print(f"CPU, float32, batch {args.batch}, {args.threads} thread(s), median of {args.repeats} interleaved rounds; "
          f"speed-up = dense time / method time (paired per round)")
    print("| model | method | GMACs dense -> method | ideal | measured wall / cpu | stage 3 GMACs | stage 3 ideal "
          "| stage 3 wall / cpu |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['gmacs_dense']:.2f} -> {r['gmacs_method']:.2f} | "
              f"{r['ideal']:.3f} | {r['whole_wall']:.3f} / {r['whole_cpu']:.3f} | "
              f"{r['stage3_gmacs_dense']:.2f} -> {r['stage3_gmacs_method']:.2f} | {r['stage3_ideal']:.3f} | "
              f"{r['stage3_wall']:.3f} / {r['stage3_cpu']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
