"""Side-by-side speed measurement of dense and token-reduced models (docs/methods.md section 8).

All requested models are built in one process and timed interleaved (A B C A B C ...): a slow moment of a
shared machine then hits every model alike. Warm-up calls are discarded, the device is synchronised around
each timed call, and the median of the repeats is reported, with batch-1 latency, peak memory, GMACs,
speed-up vs dense, the FLOPs-ideal speed-up (dense GMACs / GMACs) and efficiency = speed-up / ideal.

Methods are named by one SPEC string, `NAME[:VALUE][,KEY=VALUE ...]`: `dense`, or a registered method or
model family (`dynavit models`), e.g. `NAME:0.7`. VALUE sets the spec's primary parameter (`Spec.primary`: a
keep rate, a merge count, a budget). A model family's SPEC builds the family's twin of `--model`, and `dense`
beside it the family's dense twin (`FamilySpec.model_for` / `dense_for`: a routed PVTv2 family is
compared with its dense PVTv2 twin this way). Every SPEC is validated (its model built on the meta device)
before anything is timed.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .errors import ConfigError, check_keep_rate
from .flops import count_gmacs, count_step_flops
from .options import parse_assignment, parse_value
from .registry import FamilySpec, create_model, family_of, get_spec
from .timing import (MALLOC_TUNABLES, logits_of, make_step, peak_memory_mb, reducer_time,  # noqa: F401 (API)
                     sync, time_interleaved)


# ------------------------------------------------------------------------------------------- SPEC parsing
@dataclass(frozen=True)
class Spec:
    """One parsed `--method` SPEC."""

    text: str  # as written, e.g. "NAME:0.7" (the label in tables and JSON)
    method: Optional[str]  # registered method or model family name; None = dense
    kwargs: dict = field(default_factory=dict)  # create_model keyword arguments (keep_rate / r / budget / ...)


def parse_spec(text: str) -> Spec:
    """Parse `NAME[:VALUE][,KEY=VALUE ...]` against the registry (the one SPEC parser). Keep rates are checked
    here; every other value when the SPEC's model is validated (`resolve` + `validate`)."""
    raw = str(text).strip()
    head, *extras = [part.strip() for part in raw.split(",")]
    name, sep, value = head.partition(":")
    name = name.strip().lower()
    if name == "dense":
        if sep or extras:
            raise ConfigError(f"'dense' takes no value or options, got {raw!r}")
        return Spec(raw, None, {})
    spec = get_spec(name)
    kwargs = {}
    if sep:
        if spec.primary is None:
            raise ConfigError(f"method {name!r} takes no VALUE (SPEC {raw!r}); give KEY=VALUE options from "
                              f"{list(spec.params)}")
        if not value.strip():
            raise ConfigError(f"SPEC {raw!r} has an empty VALUE; e.g. '{name}:0.7'")
        kwargs[spec.primary] = parse_value(value.strip())
    for item in extras:
        key, val = parse_assignment(item, f"SPEC options (in {raw!r})")
        if key not in spec.params:
            raise ConfigError(f"method {name!r} has no option {key!r} (SPEC {raw!r}); it accepts {list(spec.params)}")
        kwargs[key] = val
    if "keep_rate" in kwargs and not isinstance(kwargs["keep_rate"], (list, tuple)):
        kwargs["keep_rate"] = check_keep_rate(kwargs["keep_rate"], f"keep rate in {raw!r}")
    return Spec(raw, name, kwargs)


def resolve(spec: Spec, model: str) -> tuple:
    """(model name, method or None, create_model kwargs) for a SPEC on `--model` (model families: module doc)."""
    if spec.method is None:
        family = family_of(model)
        return (family.dense_for(model) if family and family.dense_for else model), None, {}
    entry = get_spec(spec.method)
    if isinstance(entry, FamilySpec):
        return entry.model_for(model), None, dict(spec.kwargs)
    return model, spec.method, dict(spec.kwargs)


def validate(plan: tuple, model_kwargs: Optional[dict] = None) -> None:
    """Build the plan's model on the meta device (no weights, no compute): raises its ConfigError, if any."""
    name, method, kwargs = plan
    with torch.device("meta"):
        create_model(name, method=method, **{**(model_kwargs or {}), **kwargs})


# ------------------------------------------------------------------------------------------- helpers
def train_gmacs(model: nn.Module, x: Tensor) -> float:
    """GMACs per image of one training step (forward + backward), counted under the math attention backend."""
    return count_step_flops(make_step(model, x, train=True)) / x.shape[0] / 2e9


def machine_info(device: torch.device, dtype: torch.dtype, batch_size: int, train: bool, compiled: bool) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size,
            "mode": "train" if train else "inference", "compile": compiled,
            "malloc_tunables": MALLOC_TUNABLES in tunables, "glibc_tunables": tunables or None,
            "peak_mem": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                         "torch.profiler CPU allocator events, eager model"),
            "loadavg_start": list(os.getloadavg()), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ------------------------------------------------------------------------------------------- the benchmark
@dataclass
class BenchConfig:
    model: str  # --model (a model family's twins resolved per SPEC)
    specs: list  # SPEC strings; 'dense' is added first when missing
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    train: bool = False  # time forward + backward steps instead of inference forwards
    repeats: int = 9  # timed rounds at batch_size (median reported)
    warmup: int = 2  # discarded rounds
    b1_repeats: Optional[int] = None  # timed rounds at batch 1 (0 = skip; None: 21, or 0 in train mode)
    reducer_share: bool = False  # also time the reducers' hooks alone
    img_size: Optional[int] = None
    model_kwargs: dict = field(default_factory=dict)  # extra create_model arguments for every model
    seed: int = 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _build(cfg: BenchConfig, plan: tuple, device: torch.device, dtype: torch.dtype):
    name, method, kwargs = plan
    kwargs = dict(kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    torch.manual_seed(cfg.seed)
    model = create_model(name, method=method, **{**cfg.model_kwargs, **kwargs})
    return name, model.to(device=device, dtype=dtype).train(cfg.train)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Build every model, measure them side by side, return the JSON-ready report."""
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.batch_size < 1 or cfg.repeats < 1 or cfg.warmup < 0 or (cfg.b1_repeats or 0) < 0:
        raise ConfigError(f"batch size and repeats must be >= 1 (warm-up, batch-1 repeats >= 0), got batch "
                          f"{cfg.batch_size}, repeats {cfg.repeats}, warmup {cfg.warmup}, b1 {cfg.b1_repeats}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    specs = [parse_spec(s) for s in cfg.specs]
    if not any(s.method is None for s in specs):
        specs.insert(0, parse_spec("dense"))
    plans = [resolve(spec, cfg.model) for spec in specs]
    for spec, plan in zip(specs, plans):  # every SPEC validated before anything is built
        validate(plan, {**cfg.model_kwargs, **({"img_size": cfg.img_size} if cfg.img_size else {})})
    if cfg.compile:  # models share code objects (Attention.forward, ...): one compiled variant per token count
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    machine = machine_info(device, dtype, cfg.batch_size, cfg.train, cfg.compile)

    entries = []
    for spec, plan in zip(specs, plans):
        name, model = _build(cfg, plan, device, dtype)
        size = getattr(model, "img_size", 224)
        x1 = torch.randn(1, getattr(model, "in_chans", 3), size, size, device=device, dtype=dtype)
        gmacs = train_gmacs(model, x1.expand(2, -1, -1, -1).clone()) if cfg.train else count_gmacs(model, x1)
        runner = torch.compile(model) if cfg.compile else model
        entries.append(dict(spec=spec, name=name, model=model, runner=runner, size=size, gmacs=gmacs))
        log(f"built {spec.text:>16} on {name}: {gmacs:.3f} GMACs{' (train step)' if cfg.train else ''}")

    torch.manual_seed(cfg.seed)
    results = [dict(method=e["spec"].text, model=e["name"], gmacs=round(e["gmacs"], 4)) for e in entries]
    xb = {e["size"]: torch.randn(cfg.batch_size, 3, e["size"], e["size"], device=device, dtype=dtype)
          for e in entries}
    steps = [make_step(e["runner"], xb[e["size"]], cfg.train) for e in entries]
    log(f"timing batch {cfg.batch_size}: {cfg.warmup} warm-up + {cfg.repeats} interleaved rounds")
    cpu_times: list = []
    times = time_interleaved(steps, cfg.repeats, cfg.warmup, device, cpu_times)
    for r, t, c in zip(results, times, cpu_times):
        r["cpu_s_per_batch"] = round(statistics.median(c), 5)
        r["img_per_s"] = round(cfg.batch_size / statistics.median(t), 3)
        r["img_per_s_best"] = round(cfg.batch_size / min(t), 3)  # the least disturbed round (shared machines)
        r["times_s"] = [round(v, 5) for v in t]

    b1 = cfg.b1_repeats if cfg.b1_repeats is not None else (0 if cfg.train else 21)
    if b1:
        x1s = {e["size"]: xb[e["size"]][:1].clone() for e in entries}
        steps1 = [make_step(e["runner"], x1s[e["size"]], cfg.train) for e in entries]
        log(f"timing batch 1: {max(cfg.warmup, 3)} warm-up + {b1} interleaved rounds")
        for r, t in zip(results, time_interleaved(steps1, b1, max(cfg.warmup, 3), device)):
            r["latency_ms_b1"] = round(1e3 * statistics.median(t), 3)
    for r, e, step in zip(results, entries, steps):
        r.setdefault("latency_ms_b1", None)
        if device.type == "cpu" and cfg.compile:  # compiled kernels' buffers are invisible to the profiler
            step = make_step(e["model"], xb[e["size"]], cfg.train)
        r["peak_mem_mb"] = round(peak_memory_mb(step, device), 2)
        if cfg.reducer_share:
            share = reducer_time(e["model"], make_step(e["model"], xb[e["size"]], cfg.train), device)
            r["reducer_share"] = round(share[0] / share[1], 4) if share else None

    dense = next(r for r, s in zip(results, specs) if s.method is None)
    for r in results:
        r["speedup"] = round(r["img_per_s"] / dense["img_per_s"], 4)
        r["ideal_speedup"] = round(dense["gmacs"] / r["gmacs"], 4)
        r["efficiency"] = round(r["speedup"] / r["ideal_speedup"], 4)
        r["speedup_cpu_time"] = round(dense["cpu_s_per_batch"] / r["cpu_s_per_batch"], 4)
        # median over rounds of the per-round ratio: each round's models ran back to back, so a slow spell of a
        # shared machine cancels within the pair (more robust than the ratio of medians when the load drifts)
        r["speedup_paired"] = round(statistics.median(d / t for d, t in zip(dense["times_s"], r["times_s"])), 4)
        if r["latency_ms_b1"] is not None and dense["latency_ms_b1"] is not None:
            r["latency_speedup_b1"] = round(dense["latency_ms_b1"] / r["latency_ms_b1"], 4)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["img_size"] = sorted(xb)
    return {"machine": machine, "model": cfg.model, "results": results}


COLUMNS = [("method", "{:<16}"), ("gmacs", "{:>7.3f}"), ("img_per_s", "{:>9.2f}"), ("latency_ms_b1", "{:>9.2f}"),
           ("peak_mem_mb", "{:>8.1f}"), ("speedup", "{:>7.3f}"), ("ideal_speedup", "{:>7.3f}"),
           ("efficiency", "{:>6.3f}")]


def format_table(report: dict) -> str:
    """A markdown table of the results (what the CLI prints and BENCHMARKS.md shows)."""
    train = report["machine"]["mode"] == "train"
    heads = ["method", "GMACs" + (" (train)" if train else ""), ("train " if train else "") + "img/s",
             "b1 ms", "peak MB", "speed-up", "ideal", "eff."]
    cols = list(COLUMNS)
    if any("reducer_share" in r for r in report["results"]):
        heads.append("reducer %")
        cols.append(("reducer_share", "{:>6.1%}"))
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in report["results"]:
        cells = ["-" if r.get(k) is None else fmt.format(r[k]).strip() for k, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
