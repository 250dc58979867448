"""Does DiT's routing save wall-clock, per token and per node? Counted GMACs and time, side by side (docs/dit.md §8).

One DiT holding its PVTv2 twin's weights, run in these scenarios (interleaved rounds, median):
- `pvt_v2 twin`: the dense `pvt_v2_bX` model itself (the reference);
- `route (forced)`: DiT with force_gates("pvt_v2") (same work as the twin: the grid's own overhead);
- `full space (open)`: every gate open;
- `per-token p`: PVTv2's route, but at each block node a random fraction 1 - p of the alive tokens takes the identity
  (and stops there, as the routing rules say): the gathered per-token path;
- `... dense>0.5`: the same with `dense_above=0.5` (crowded nodes run on the whole map, masked: the cost model);
- `early coarsening c`: each stage hands all its tokens to the next scale c columns early and the last c columns of
  the 1/32 scale stop: whole nodes skipped, no gathering (a node-level route with similar GMACs).
Printed per scenario: GMACs / image (info), executed GMACs / image (batch padding included), GMAC ratio, time ratio
against the twin (wall-clock, and the process's CPU time: on an oversubscribed machine the CPU time of a one-thread
run is the robust measure of its work, wall-clock also counts the time it waited), and efficiency =
(twin time / time) / (twin GMACs / GMACs) on CPU time (1.0 = time falls as GMACs do).

    .venv/bin/python benchmarks/dit_speed.py --model dit_b0 --batch 8
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from dynavit.timing import malloc_tunables_on, reexec_with_malloc_tunables  # noqa: E402

if "--no-reexec" not in sys.argv:  # docs/methods.md section 8: malloc page faults otherwise add 10-35% noise
    reexec_with_malloc_tunables(sys.argv)

import torch  # noqa: E402

import dynavit  # noqa: E402
from dynavit.models.dit import DiT  # noqa: E402


def set_route_gates(model: DiT, keep: float = 1.0, early: int = 0, seed: int = 0) -> None:
    """Learned gates on PVTv2's route: per-token random transform (fraction `keep`) or `early` columns of coarsening."""
    g = torch.Generator().manual_seed(seed)
    z = 50.0 if keep >= 1.0 else math.sqrt(2) * torch.erfinv(torch.tensor(2 * keep - 1)).item()  # Phi^-1(keep)
    big = 50.0
    with torch.no_grad():
        for n, gate in enumerate(model.gates):
            i, j = model.nodes[n]
            end = model.starts[i + 1]  # first column after scale i's own stage
            on_route = model.has_block(i, j) and model.stage_of[j] == i
            if early:  # scale i runs columns [start_i - early, end - early) (clipped), then moves down
                lo = max(model.starts[i] - early, 0) if i > 0 else 0
                on_route = model.has_block(i, j) and lo <= j < end - early
                down = model.has_down(i, j) and j == end - early
            else:
                down = model.has_down(i, j) and j == end
            gate.weight.zero_()
            if on_route and keep < 1.0:
                w = torch.randn(gate.weight.shape[1], generator=g)
                gate.weight[0].copy_(w / w.norm())  # w . LN(x) ~ N(0, about 1)
            gate.bias.copy_(torch.tensor([z if on_route else -big, big if down else -big]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit_b0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    p.add_argument("--early", type=int, nargs="*", default=[1])
    p.add_argument("--dense-above", type=float, default=0.5, help="the cost model's threshold for the extra rows")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    twin = dynavit.create_model(args.model.replace("dit_", "pvt_v2_"), img_size=args.img_size).eval()
    model = dynavit.create_model(args.model, img_size=args.img_size).eval()
    dynavit.load_state_dict(model, twin.state_dict(), strict=False)
    scenarios = {"pvt_v2 twin": None, "route (forced)": ("pvt_v2",), "full space (open)": ("open",)}
    scenarios.update({f"per-token p={k:g}": (None, k, 0) for k in args.keep})
    scenarios.update({f"per-token p={k:g} dense>{args.dense_above:g}": (None, k, 0, args.dense_above)
                      for k in args.keep})
    scenarios.update({f"early coarsening {c}": (None, 1.0, c) for c in args.early})

    def configure(spec):
        if spec is None:
            return twin
        model.force_gates(spec[0])
        model.dense_above = spec[3] if len(spec) > 3 else 1.0
        if spec[0] is None:
            set_route_gates(model, spec[1], spec[2])
        return model

    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    stats, times, cpu = {}, {k: [] for k in scenarios}, {k: [] for k in scenarios}
    twin_gmacs = model.twin_gmacs((args.img_size, args.img_size))
    with torch.inference_mode():
        for name, spec in scenarios.items():  # warm-up + GMACs
            m = configure(spec)
            if m is twin:
                m(x)
                stats[name] = (twin_gmacs, twin_gmacs, 1.0)
                continue
            _, info = m(x, return_info=True)
            ran = sum(int(r.sum()) for r in info.extra["ran"]) / args.batch
            stats[name] = (info.extra["gmacs"].mean().item(), info.extra["executed_gmacs"] / args.batch, ran)
        route_runs = stats["route (forced)"][2]
        for _ in range(args.repeats):
            for name, spec in scenarios.items():
                m = configure(spec)
                t, c = time.perf_counter(), time.process_time()
                m(x)
                cpu[name].append(time.process_time() - c)
                times[name].append(time.perf_counter() - t)
    ref, ref_cpu = statistics.median(times["pvt_v2 twin"]), statistics.median(cpu["pvt_v2 twin"])
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, fp32, {args.threads} thread(s), GLIBC_TUNABLES "
          f"{'on' if malloc_tunables_on() else 'off'}, median of {args.repeats} "
          f"interleaved rounds; twin {twin_gmacs:.3f} GMACs, full space {model.space_gmacs():.3f}")
    print(f"{'scenario':<30}{'GMACs/img':>10}{'exec/img':>10}{'GMAC ratio':>11}{'wall ms':>9}{'wall ratio':>11}"
          f"{'cpu ms':>8}{'cpu ratio':>10}{'efficiency':>11}{'block runs':>11}")
    for name in scenarios:
        g, e, runs = stats[name]
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        runs = runs / route_runs if name != "pvt_v2 twin" else 1.0
        print(f"{name:<30}{g:>10.3f}{e:>10.3f}{g / twin_gmacs:>11.3f}{t * 1e3:>9.1f}{t / ref:>11.3f}"
              f"{c * 1e3:>8.1f}{c / ref_cpu:>10.3f}{(ref_cpu / c) / (twin_gmacs / g):>11.3f}{runs:>11.3f}")


if __name__ == "__main__":
    main()
