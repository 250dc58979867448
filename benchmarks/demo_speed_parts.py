"""Where a reduced forward of the demo's 64-wide model spends its time (docs/demo.md finding 7).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
        .venv/bin/python benchmarks/demo_speed_parts.py [--batch-size 128] [--rounds 10]

Prints, on the shipped demo weights and the demo's own validation images:
1. fused attention (`scaled_dot_product_attention`, the demo's 2 heads of 32) per token pair at the token counts
   the methods produce, relative to 197 tokens, and an explicit softmax attention's time beside it (interleaved);
2. the reducer's share of each shipped method's forward (`timing.reducer_time`: its hooks timed on the instance);
3. BAT's reducer by part (matching, DPC clustering, the rest of the plan, the merge), per forward.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F

from dynavit.demo import DemoConfig, bench_batch, load_asset, method_asset, val_images
from dynavit.methods import _cluster, bat
from dynavit.timing import make_step, reducer_time, time_interleaved

CPU = torch.device("cpu")


def attention_costs(batch: int, rounds: int, counts=(197, 139, 98, 69, 51, 28), heads: int = 2, dim: int = 32):
    print(f"fused attention, batch {batch}, {heads} heads of {dim}: time per token pair relative to {counts[0]} tokens")
    base = None
    with torch.inference_mode():
        for n in counts:
            q, k, v = torch.randn(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
            steps = [lambda: F.scaled_dot_product_attention(q, k, v),
                     lambda: ((q @ k.transpose(-2, -1)) * dim ** -0.5).softmax(-1) @ v]
            fused, explicit = (statistics.median(t) * 1e3 for t in time_interleaved(steps, rounds, 1, CPU))
            per_pair = fused / n ** 2
            base = base or per_pair
            print(f"  {n:4d} tokens: SDPA {fused:7.2f} ms ({per_pair / base:4.2f}x per pair), explicit / SDPA "
                  f"{explicit / fused:4.2f}")


def bat_parts(model, x, rounds: int) -> dict:
    """ms per forward in BAT's matching, clustering, plan and merge (functions wrapped for the measurement)."""
    spent = collections.defaultdict(float)
    wrapped = [(_cluster, "greedy_pairs"), (bat, "cluster_inattentive"), (bat, "bat_plan"), (bat, "merge_tokens")]
    originals = [getattr(mod, name) for mod, name in wrapped]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t0
            return out
        return wrapper

    for (mod, name), fn in zip(wrapped, originals):
        setattr(mod, name, timed(name, fn))
    try:
        with torch.inference_mode():
            model(x)
            spent.clear()
            for _ in range(rounds):
                model(x)
    finally:
        for (mod, name), fn in zip(wrapped, originals):
            setattr(mod, name, fn)
    parts = {k: v * 1e3 / rounds for k, v in spent.items()}
    parts["plan (rest)"] = parts.pop("bat_plan") - parts["greedy_pairs"] - parts["cluster_inattentive"]
    return parts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--counts", type=int, nargs="+", default=[197, 139, 98, 69, 51, 28],
                   help="token counts of the attention table (the first is the reference)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    attention_costs(args.batch_size, args.rounds, tuple(args.counts))

    cfg = DemoConfig()
    dense = load_asset(cfg.backbone, root=cfg.asset_root).eval()
    images, _ = val_images(args.batch_size, dense.img_size, cfg.seed)
    x = bench_batch(images, args.batch_size)
    print(f"\nreducer share of the forward (batch {args.batch_size}, shipped weights, validation images)")
    for method, keep in (("dynamicvit", 0.7), ("evit", 0.7), ("bat", 0.7), ("tome", 0.7), ("bat", 0.5)):
        model = load_asset(method_asset(cfg.backbone, method, keep), root=cfg.asset_root).eval()
        hooks, total = reducer_time(model, make_step(model, x, train=False), CPU, calls=3)
        print(f"  {method}:{keep:g}: reducer {hooks * 1e3 / 3:6.1f} ms of {total * 1e3 / 3:6.1f} ms per forward "
              f"({100 * hooks / total:4.1f} %)")
        if method == "bat":
            parts = bat_parts(model, x, max(3, args.rounds // 2))
            print("      " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
