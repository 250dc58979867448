"""Where does a reduced model's time go? torch.profiler op table plus the reducer's share of the forward.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
        .venv/bin/python benchmarks/profile_method.py --model deit_small_patch16_224 --method bat:0.7 --batch-size 32

The reducer share times the method's hooks (decide + cluster / match + merge) by wrapping them
(`dynavit.timing.reducer_time`); the op table (self CPU time) shows which kernels dominate, and the
`record_function` ranges `reducer.*` show the hooks inside the profile.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dynavit import bench, timing


def _ranged(name, fn):
    """A reducer hook wrapped in a profiler range named reducer.<hook>."""
    def wrapper(*args, **kwargs):
        with record_function(f"reducer.{name}"):
            return fn(*args, **kwargs)
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", default="bat:0.7", help="a SPEC as for `dynavit bench`")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--calls", type=int, default=3, help="forwards timed for the reducer share")
    p.add_argument("--train", action="store_true", help="profile a training step (forward + backward)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench.BenchConfig(model=args.model, specs=[args.method], batch_size=args.batch_size)
    spec = bench.parse_spec(args.method)
    name, model = bench._build(cfg, bench.resolve(spec, args.model), torch.device("cpu"), torch.float32)
    model.train(args.train)
    x = torch.randn(args.batch_size, 3, model.img_size, model.img_size)
    step = timing.make_step(model, x, train=args.train)
    share = timing.reducer_time(model, step, torch.device("cpu"), calls=args.calls)
    if share:
        print(f"{spec.text} on {name}: reducer hooks {share[0] / args.calls * 1e3:.1f} ms of "
              f"{share[1] / args.calls * 1e3:.1f} ms per forward = {share[0] / share[1]:.1%}")
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if share:
            with timing.wrapped_hooks(model.reducer, _ranged):
                step()
        else:
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)
    if args.json:
        totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("reducer.")}
        with open(args.json, "w") as f:
            json.dump({"method": spec.text, "model": name, "batch_size": args.batch_size,
                       "reducer_share": share[0] / share[1] if share else None, "reducer_ms": totals}, f, indent=2)


if __name__ == "__main__":
    main()
