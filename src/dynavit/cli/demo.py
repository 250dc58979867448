"""`dynavit demo [--output DIR] [--quick] [--from-scratch]`: the main job on the embedded default (see dynavit.demo).

The full demo fine-tunes DynamicViT live at each keep rate and evaluates every method on 2,000 validation
images; `--quick` uses the shipped DynamicViT weights instead (a smoke test); `--from-scratch` first re-runs the
`dynavit train` commands that made the shipped models (listed in assets/demo_models.json; hours on 2 CPU
cores). A rerun replaces the previous run's fine-tunes (and says so).
"""
from __future__ import annotations

from ..extras import require


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: fine-tune, prune, merge and route on the embedded digits, "
                       "print accuracy / GMACs / speed, draw what each method kept")
    p.add_argument("--output", default="demo-output", help="where results.json and the PNGs go (default "
                   "demo-output)")
    p.add_argument("--quick", action="store_true", help="no live fine-tuning: the shipped DynamicViT weights, "
                   "fewer validation images (a smoke test)")
    p.add_argument("--from-scratch", action="store_true", help="retrain the shipped models first with the "
                   "commands in assets/demo_models.json (long)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5], metavar="RHO",
                   help="keep rates with shipped weights (default 0.7 0.5)")
    p.add_argument("--dynamicvit-steps", type=int, default=None, help="live DynamicViT fine-tuning steps per keep "
                   "rate (default 150, batch 32)")
    p.add_argument("--val-images", type=int, default=None, help="validation images (default 2000; --quick 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-malloc-tunables", action="store_true",
                   help="time with glibc's default allocator (by default the demo re-executes itself with its malloc "
                        "thresholds raised, as dynavit bench does: BENCHMARKS.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..timing import launched_as, reexec_with_malloc_tunables

    if not args.no_malloc_tunables and launched_as("demo"):  # not from a library or test caller
        reexec_with_malloc_tunables(["-m", "dynavit", *sys.argv[1:]])
    require("train", "dynavit demo (its dataset)", ("sklearn", "skimage"))
    require("plot", "dynavit demo (its figures)", ("matplotlib",))
    from ..demo import DemoConfig
    from ..demo import run as run_demo
    from ..errors import ConfigError, check_keep_rate

    keep_rates = tuple(check_keep_rate(k, "--keep-rates") for k in args.keep_rates)
    cfg = DemoConfig(output=args.output, quick=args.quick, keep_rates=keep_rates, seed=args.seed,
                     val_images=args.val_images or (300 if args.quick else 2000),
                     bench_repeats=3 if args.quick else 7, bench_batch=32 if args.quick else 128)
    for name in ("dynamicvit_steps", "val_images"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(cfg, name, value)
    if args.from_scratch:
        from ..demo import retrain_assets

        cfg.asset_root = retrain_assets(args.output)
    run_demo(cfg)
    return 0
