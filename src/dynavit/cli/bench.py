"""`dynavit bench --model M --method SPEC [--method SPEC ...]`: side-by-side throughput, batch-1 latency, memory.

SPEC: `dense`, or `NAME[:VALUE]` for a method or model family listed by `dynavit models` (VALUE sets its first
parameter, e.g. a keep rate), optionally with `,KEY=VALUE` options (see `dynavit.bench`). On start the command
re-executes itself once with glibc's malloc thresholds raised (docs/methods.md section 8: the default
thresholds cost 45k-220k page faults per DeiT-S forward and make timings swing by up to 35%);
`--no-malloc-tunables` keeps the default allocator. The JSON says which was used.
"""
from __future__ import annotations

import json
import sys

from ..bench import BenchConfig, format_table, run_benchmark
from ..options import parse_assignments
from ..timing import launched_as, reexec_with_malloc_tunables
from ._common import number


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure dense and reduced models side by side (img/s, latency, memory)")
    p.add_argument("--model", default="deit_small_patch16_224", help="backbone (default: deit_small_patch16_224)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="repeatable: dense or NAME[:VALUE][,KEY=VALUE ...] of a method / model family "
                        "(`dynavit models`); dense is added when missing")
    p.add_argument("--batch-size", type=number(int, ">=1"), default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (compilation is warm-up)")
    p.add_argument("--threads", type=number(int, ">=1"), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--train", action="store_true", help="time training steps (forward + backward) instead")
    p.add_argument("--repeats", type=number(int, ">=1"), default=9, help="timed interleaved rounds (median reported)")
    p.add_argument("--warmup", type=number(int, ">=0"), default=2, help="discarded rounds before timing")
    p.add_argument("--b1-repeats", type=number(int, ">=0"), default=None,
                   help="batch-1 latency rounds (default 21; 0 in --train mode; 0 = skip)")
    p.add_argument("--reducer-share", action="store_true",
                   help="also time each reducer's hooks alone and report their share of the model time")
    p.add_argument("--img-size", type=number(int, ">=1"), default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra create_model argument for every model (repeatable)")
    p.add_argument("--pretrained", action="store_true", help="load the released weights into every model")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--no-malloc-tunables", action="store_true",
                   help="do not re-execute with raised glibc malloc thresholds")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.no_malloc_tunables and launched_as("bench"):  # not from a library or test caller
        reexec_with_malloc_tunables(["-m", "dynavit", *sys.argv[1:]])
    kw = parse_assignments(args.set)
    if args.pretrained:
        kw["pretrained"] = True
    cfg = BenchConfig(model=args.model, specs=args.method or ["dense"], batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, compile=args.compile, threads=args.threads,
                      train=args.train, repeats=args.repeats, warmup=args.warmup, b1_repeats=args.b1_repeats,
                      reducer_share=args.reducer_share, img_size=args.img_size, model_kwargs=kw)
    report = run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    m = report["machine"]
    print(f"{args.model} | {m['mode']} | {m['device']} ({m['device_name']}) | {m['dtype']} | batch {m['batch_size']} | "
          f"threads {m['threads']} | torch {m['torch']} | compile {m['compile']} | malloc tunables "
          f"{'on' if m['malloc_tunables'] else 'off'} | load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
