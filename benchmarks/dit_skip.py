"""Does closing DiT gates really remove work? Counted GMACs and wall-clock, side by side (docs/dit.md).

Runs on one DiT model with its weights unchanged, in these scenarios:
- all gates forced open: the dense twin path, which is the reference;
- one node forced closed, and all nodes of the 1/4 scale forced closed;
- learned-style gates with random weights, where roughly half the tokens are active per node.
Each scenario reports the info's GMACs and the executed GMACs per image, next to the median time and the
time ratio against the reference. The runs are interleaved, and the median of `--repeats` is taken.

    .venv/bin/python benchmarks/dit_skip.py --model dit_b0 --batch 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from dynavit.timing import malloc_tunables_on, reexec_with_malloc_tunables  # noqa: E402

if "--no-reexec" not in sys.argv:  # docs/methods.md section 8: malloc page faults otherwise add 10-35% noise
    reexec_with_malloc_tunables(sys.argv)

import torch  # noqa: E402

import dynavit  # noqa: E402


def half_open_gates(model, seed: int = 0) -> None:
    """Random gate weights with biases set so that about half the tokens take each gate's 'on' branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) / gate.weight.shape[1] ** 0.5)
            gate.bias.copy_(torch.tensor([0.0, 1.5]))  # transform ~ 50%, stay ~ 90%


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit_b0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = dynavit.create_model(args.model, img_size=args.img_size).eval()
    half_open_gates(model)
    first_scale = [n for n in model.node_names if n.startswith("s0.")]
    scenarios = {
        "all open (dense twin)": [("open", None)],
        "s0.b0 closed": [("open", None), ("closed", ["s0.b0"])],
        "scale 1/4 closed": [("open", None), ("closed", first_scale)],
        "learned gates (~half)": [(None, None)],
    }
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    def configure(name):
        model.force_gates(None)
        for mode, nodes in scenarios[name]:
            model.force_gates(mode, nodes)

    stats, times = {}, {k: [] for k in scenarios}
    with torch.inference_mode():
        for name in scenarios:  # warm-up + GMACs
            configure(name)
            _, info = model(x, return_info=True)
            active = sum(int(a.sum()) for a in info.extra["active"]) / args.batch
            stats[name] = (info.extra["gmacs"].mean().item(), info.extra["executed_gmacs"] / args.batch, active)
        for _ in range(args.repeats):
            for name in scenarios:
                configure(name)
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    model.force_gates(None)
    ref = statistics.median(times["all open (dense twin)"])
    full = model.full_gmacs((args.img_size, args.img_size))
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, fp32, {args.threads} thread(s), "
          f"GLIBC_TUNABLES {'on' if malloc_tunables_on() else 'off'}, "
          f"median of {args.repeats}; full GMACs {full:.3f}")
    print(f"{'scenario':<24}{'GMACs/img':>10}{'exec/img':>10}{'GMAC ratio':>11}{'ms/batch':>10}{'time ratio':>11}"
          f"{'tokens run/img':>15}")
    for name in scenarios:
        g, e, a = stats[name]
        t = statistics.median(times[name])
        print(f"{name:<24}{g:>10.3f}{e:>10.3f}{g / full:>11.3f}{t * 1e3:>10.1f}{t / ref:>11.3f}{a:>15.0f}")


if __name__ == "__main__":
    main()
