"""dynavit next to the authors' own code, in one process: same weights, logits checked, interleaved timing.

    .venv/bin/python benchmarks/vs_authors.py --timm /work/authors/site --dynamicvit /work/authors/DynamicViT \
        --evit /work/authors/evit --tome /work/authors/ToMe --batch-size 32 --json vs_authors_b32.json

Pairs timed (DeiT-S at 224, float32, eval mode, `torch.inference_mode()`):

- dense: dynavit's `deit_small_patch16_224` / timm 0.4.12's `VisionTransformer` (the DeiT definition the three
  repositories build on);
- dynamicvit: `dynamicvit` keep rate 0.7 / the DynamicViT authors' `VisionTransformerDiffPruning`
  (`models/dyvit.py`, pruning before blocks 3, 6, 9 with ratios 0.7, 0.49, 0.343, as their `main.py`);
- evit: `evit` 0.7 / the EViT authors' `EViT` (`evit.py`, keep rate 0.7 in blocks 3, 6, 9, `fuse_token=True`);
- tome: `tome` r=13 / timm's `VisionTransformer` patched by the ToMe authors' `tome.patch.timm`, `model.r = 13`.

Nothing of the authors' repositories is copied here: the script imports them from the checkouts given on the
command line (bring them with `git clone` or `git archive`). timm 0.4.12 must be importable from `--timm`
(`pip install --no-deps --target DIR timm==0.4.12`, outside dynavit's environment). Imports that their code
makes but never uses on this path (torchvision in timm.data, `torch._six` and tensorboardX in DynamicViT's
utils.py, torchprofile in EViT's helpers.py) are satisfied by stand-in modules whose functions raise if called.

Each dynavit model is built first and given random but non-degenerate weights (peaked attention, predictor
outputs without near-ties, so top-k selections are not decided by rounding); its state dict is loaded strictly
into the authors' model. Their logits must agree before anything is timed: in float64 to 1e-6 of the largest
logit (the same tokens kept / merged, the same function; dense, DynamicViT and EViT agree to about 1e-13, ToMe to
3e-8 because dynavit keeps token sizes, and so ToMe's log-size bias, in float32), in float32 to --atol. Then all models are timed interleaved (ours, theirs, ours, theirs, ... for every method,
`dynavit.bench.time_interleaved`), at the batch size given and at batch 1. Reported per method:
ratio = authors' median time / ours (> 1: dynavit is faster), and `paired`, the median over rounds of the same
ratio within a round (the two ran back to back, so a slow spell of a shared machine cancels).

Like `dynavit bench`, the script re-executes itself once with glibc's malloc thresholds raised
(docs/methods.md section 8; `--no-malloc-tunables` to measure the default allocator).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from functools import partial

import torch
from torch import nn

from dynavit import create_model
from dynavit.bench import machine_info, make_step, time_interleaved
from dynavit.timing import reexec_with_malloc_tunables

METHODS = ("dense", "dynamicvit", "evit", "tome")
DEIT_S = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True)


# ------------------------------------------------------------------------------------------- stand-ins
def _refuse(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in of benchmarks/vs_authors.py; this code path needs the real package")
    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


class _StandIn(types.ModuleType):
    """A module whose every missing attribute is a function that raises when called (import-time names only)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _refuse(f"{self.__name__}.{attr}")


def install_stand_ins() -> None:
    """Stand-ins for modules the authors' code imports but never calls here (only where the real one is absent)."""
    def add(name: str, **attrs) -> types.ModuleType:
        mod = _StandIn(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
        return mod

    if importlib.util.find_spec("torchvision") is None:
        add("torchvision")
        add("torchvision.transforms")
        add("torchvision.transforms.functional")
        add("torchvision.datasets")
    try:
        import torch._six  # noqa: F401  (removed in torch 2)
    except ImportError:
        add("torch._six", inf=math.inf, string_classes=(str, bytes))
    for name, attrs in (("tensorboardX", {}), ("torchprofile", {})):
        if importlib.util.find_spec(name) is None:
            add(name, **attrs)


def _load_file(name: str, path: str, search_root: str) -> types.ModuleType:
    """Import one file of a checkout as module `name`, with its repository root on sys.path for its imports."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: pass the root of the authors' checkout")
    sys.path.insert(0, search_root)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(search_root)
    return mod


# ------------------------------------------------------------------------------------------- models
def randomize(model: nn.Module, seed: int) -> None:
    """Random, non-degenerate weights (as the reference fixtures): N(0, 1/fan_in) weights, qkv 2.5x (peaked
    attention), biases ~0.1, norm weights 1 +- 0.2, DynamicViT's predictor outputs 8x (no near-tied scores)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name not in ("cls_token", "pos_embed", "dist_token"):
                fan_in = p[0].numel()
                scale = 2.5 if name.endswith("qkv.weight") else 8.0 if name.endswith("out_conv.4.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(fan_in))
            elif name in ("cls_token", "pos_embed", "dist_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights
                p.copy_(1.0 + 0.4 * (torch.rand(p.shape, generator=g) - 0.5))


def ours(method: str) -> nn.Module:
    kw = {"dense": {}, "dynamicvit": {"keep_rate": 0.7}, "evit": {"keep_rate": 0.7}, "tome": {"r": 13}}[method]
    return create_model("deit_small_patch16_224", method=None if method == "dense" else method, **kw)


def authors(method: str, paths: argparse.Namespace) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    norm = partial(nn.LayerNorm, eps=1e-6)
    if method == "dense":
        return VisionTransformer(**DEIT_S, norm_layer=norm)
    if method == "dynamicvit":
        dyvit = _load_file("_authors_dyvit", os.path.join(paths.dynamicvit, "models", "dyvit.py"), paths.dynamicvit)
        return dyvit.VisionTransformerDiffPruning(**DEIT_S, pruning_loc=[3, 6, 9],
                                                  token_ratio=[0.7, 0.7 ** 2, 0.7 ** 3], distill=True)
    if method == "evit":
        evit = _load_file("_authors_evit", os.path.join(paths.evit, "evit.py"), paths.evit)
        keep = [1.0] * 12
        for loc in (3, 6, 9):
            keep[loc] = 0.7
        return evit.EViT(**DEIT_S, norm_layer=norm, keep_rate=tuple(keep), fuse_token=True)
    if method == "tome":
        sys.path.insert(0, paths.tome)
        try:
            import tome
        finally:
            sys.path.remove(paths.tome)
        model = VisionTransformer(**DEIT_S, norm_layer=norm)
        tome.patch.timm(model)
        model.r = 13
        return model
    raise ValueError(method)


def build_pair(method: str, paths: argparse.Namespace, seed: int) -> tuple:
    mine = ours(method).eval()
    randomize(mine, seed)
    theirs = authors(method, paths).eval()
    missing, unexpected = theirs.load_state_dict(mine.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"{method}: state dicts differ: missing in dynavit's {missing}, extra {unexpected}")
    return mine, theirs


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------- main
def summarize(times: list, methods: list, batch: int) -> list:
    rows = []
    for j, m in enumerate(methods):
        t_ours, t_auth = times[2 * j], times[2 * j + 1]
        rows.append(dict(method=m, ours_s=statistics.median(t_ours), authors_s=statistics.median(t_auth),
                         ratio=statistics.median(t_auth) / statistics.median(t_ours),
                         paired=statistics.median(a / o for a, o in zip(t_auth, t_ours)),
                         ours_times_s=[round(v, 5) for v in t_ours], authors_times_s=[round(v, 5) for v in t_auth],
                         batch=batch))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm", required=True, help="directory holding timm 0.4.12 (pip install --target DIR)")
    p.add_argument("--dynamicvit", required=True, help="checkout of raoyongming/DynamicViT")
    p.add_argument("--evit", required=True, help="checkout of youweiliang/evit")
    p.add_argument("--tome", required=True, help="checkout of facebookresearch/ToMe")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds at --batch-size (median)")
    p.add_argument("--b1-repeats", type=int, default=21, help="timed rounds at batch 1 (0 = skip)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--atol", type=float, default=1e-4, help="largest logit difference allowed, relative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--no-malloc-tunables", action="store_true")
    args = p.parse_args()
    if not args.no_malloc_tunables:
        reexec_with_malloc_tunables(sys.argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; allowed {list(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.timm, args.dynamicvit, args.evit, args.tome):
        if not os.path.isdir(path):
            raise SystemExit(f"{path} is not a directory")
    install_stand_ins()
    sys.path.insert(0, args.timm)
    import timm

    if timm.__version__ != "0.4.12":
        print(f"warning: timm {timm.__version__} from {timm.__file__}, the authors' code was written for 0.4.12")

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, 224, 224)
    models, checks = [], {}
    for m in methods:
        mine, theirs = build_pair(m, args, args.seed)
        checks[m] = {}
        for dtype in (torch.float64, torch.float32):  # float64 first: same tokens chosen, same function
            mine.to(dtype), theirs.to(dtype)  # float32 -> float64 -> float32 is exact
            xd = x[:4].to(dtype)
            with torch.inference_mode():
                diff = max(max_rel_diff(mine(xd), theirs(xd)), max_rel_diff(mine(xd[:1]), theirs(xd[:1])))
            checks[m][str(dtype).replace("torch.", "")] = diff
        print(f"{m:>10}: logits max |dynavit - authors| / max |authors|: float64 {checks[m]['float64']:.1e}, "
              f"float32 {checks[m]['float32']:.1e}", flush=True)
        if checks[m]["float64"] > 1e-6 or checks[m]["float32"] > args.atol:
            raise SystemExit(f"{m}: logits differ ({checks[m]}) beyond 1e-6 (float64) / --atol {args.atol} "
                             f"(float32); not timing")
        models += [mine, theirs]

    machine = machine_info(torch.device("cpu"), torch.float32, args.batch_size, False, False)
    machine["timm"] = timm.__version__
    steps = [make_step(model, x, train=False) for model in models]
    print(f"timing batch {args.batch_size}: {args.warmup} warm-up + {args.repeats} interleaved rounds", flush=True)
    t0 = time.perf_counter()
    rows = summarize(time_interleaved(steps, args.repeats, args.warmup, torch.device("cpu")), methods, args.batch_size)
    rows1 = []
    if args.b1_repeats:
        x1 = x[:1].clone()
        steps1 = [make_step(model, x1, train=False) for model in models]
        print(f"timing batch 1: {max(args.warmup, 3)} warm-up + {args.b1_repeats} interleaved rounds", flush=True)
        rows1 = summarize(time_interleaved(steps1, args.b1_repeats, max(args.warmup, 3), torch.device("cpu")),
                          methods, 1)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"\nload average {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}, "
          f"{torch.get_num_threads()} threads, malloc tunables {'on' if machine['malloc_tunables'] else 'off'}")
    heads = ["method", f"b{args.batch_size} ours img/s", "authors img/s", "ratio", "paired"]
    if rows1:
        heads += ["b1 ours ms", "authors ms", "ratio", "paired"]
    heads.append("logits rel. diff (fp32)")
    print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for j, r in enumerate(rows):
        cells = [r["method"], f"{args.batch_size / r['ours_s']:.2f}", f"{args.batch_size / r['authors_s']:.2f}",
                 f"{r['ratio']:.3f}", f"{r['paired']:.3f}"]
        if rows1:
            s = rows1[j]
            cells += [f"{1e3 * s['ours_s']:.2f}", f"{1e3 * s['authors_s']:.2f}", f"{s['ratio']:.3f}",
                      f"{s['paired']:.3f}"]
        cells.append(f"{checks[r['method']]['float32']:.1e}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "logits_rel_diff": checks, "batch": rows, "batch1": rows1}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
