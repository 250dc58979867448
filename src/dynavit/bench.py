"""Side-by-side speed measurement of dense and token-reduced models (METHODS section 8).

All requested models are built in one process and timed interleaved (A B C A B C ...): a slow moment of a
shared machine then hits every model alike. Warm-up calls are discarded, the device is synchronised around
each timed call, and the median of the repeats is reported, with batch-1 latency, peak memory, GMACs,
speed-up vs dense, the FLOPs-ideal speed-up (dense GMACs / GMACs) and efficiency = speed-up / ideal.

Methods are named by one SPEC string, `NAME[:VALUE][,KEY=VALUE ...]`: `dense`, `dynamicvit:0.7`, `evit:0.7`,
`bat:0.7`, `topk:0.7` (VALUE = keep rate), `tome:13` (VALUE = r), `dit:0.5` (VALUE = budget). A method works
here as soon as it registers: VALUE goes to the first of keep_rate / r / budget that the method accepts.

DiT is a model family, not a hook on a ViT: `dit:B` builds the DiT twin of `--model` (`pvt_v2_bX` -> `dit_bX`)
with budget B, and `dense` next to it builds the dense PVTv2 twin (`dit_bX` -> `pvt_v2_bX`), so
`--model dit_b0 --method dense --method dit:0.5` compares DiT-B0 at budget 0.5 with PVTv2-B0.
If `dit` is ever registered as a method, it is applied like any other method instead.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, check_keep_rate, unknown_name

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
# the meaning of a SPEC's VALUE for the known methods; other registered methods: first of _VALUE_PARAMS they take
_PRIMARY = {"dynamicvit": "keep_rate", "evit": "keep_rate", "bat": "keep_rate", "topk": "keep_rate",
            "tome": "r", "dit": "budget"}
_VALUE_PARAMS = ("keep_rate", "r", "budget")


# ------------------------------------------------------------------------------------------- SPEC parsing
@dataclass(frozen=True)
class Spec:
    """One parsed `--method` SPEC."""

    text: str  # as written, e.g. "evit:0.7" (the label in tables and JSON)
    method: Optional[str]  # registered method name; None = dense
    kwargs: dict = field(default_factory=dict)  # create_model keyword arguments (keep_rate / r / budget / ...)


def _check_value(param: str, value, spec: str):
    if param == "keep_rate":
        return check_keep_rate(value, f"keep rate in {spec!r}")
    if param == "r":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"r in {spec!r} must be a non-negative integer (tokens merged per block), got {value!r}")
        return value
    if param == "budget":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(f"budget in {spec!r} must be a number in (0, 1], got {value!r}")
        return float(value)
    return value


def _literal(text: str):
    from .cli._common import parse_value

    return parse_value(text)


def parse_spec(text: str) -> Spec:
    """Parse and validate `NAME[:VALUE][,KEY=VALUE ...]` against the method registry (the one SPEC parser)."""
    from .registry import list_methods

    raw = str(text).strip()
    head, *extras = [part.strip() for part in raw.split(",")]
    name, sep, value = head.partition(":")
    name = name.strip().lower()
    if name == "dense":
        if sep or extras:
            raise ConfigError(f"'dense' takes no value or options, got {raw!r}")
        return Spec(raw, None, {})
    methods = list_methods()
    if name not in methods and name != "dit":
        raise unknown_name("method", name, ["dense", *methods])
    params = methods[name].params if name in methods else ("budget",)
    primary = _PRIMARY.get(name) or next((p for p in _VALUE_PARAMS if p in params), None)
    kwargs = {}
    if sep:
        if primary is None:
            raise ConfigError(f"method {name!r} takes no VALUE (SPEC {raw!r}); give KEY=VALUE options from "
                              f"{list(params)}")
        if not value.strip():
            raise ConfigError(f"SPEC {raw!r} has an empty VALUE; e.g. '{name}:0.7'")
        kwargs[primary] = _check_value(primary, _literal(value.strip()), raw)
    for item in extras:
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"SPEC options must be KEY=VALUE, got {item!r} in {raw!r}")
        if name in methods and key not in params:
            raise ConfigError(f"method {name!r} has no option {key!r} (SPEC {raw!r}); it accepts {list(params)}")
        kwargs[key] = _check_value(key, _literal(val.strip()), raw)
    return Spec(raw, name, kwargs)


def _twin(model: str, prefix_from: str, prefix_to: str) -> str:
    return prefix_to + model[len(prefix_from):] if model.startswith(prefix_from) else model


def resolve(spec: Spec, model: str) -> tuple:
    """(model name, method or None, create_model kwargs) for a SPEC on `--model` (DiT twins: module doc)."""
    from .registry import list_methods

    dit_is_method = "dit" in list_methods()
    if spec.method == "dit" and not dit_is_method:
        if not model.startswith(("dit_", "pvt_v2_")):
            raise ConfigError(f"SPEC {spec.text!r} needs a DiT or PVTv2 model (e.g. --model dit_b0 or pvt_v2_b0, "
                              f"compared with its dense PVTv2 twin), got --model {model!r}")
        return _twin(model, "pvt_v2_", "dit_"), None, dict(spec.kwargs)
    if spec.method is None and not dit_is_method:
        return _twin(model, "dit_", "pvt_v2_"), None, {}
    return model, spec.method, dict(spec.kwargs)


# ------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_of(out, batch: int) -> Tensor:
    """The (B, classes) logits in whatever a model returns (DynamicViT returns its loss inputs in training)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):  # e.g. DynamicViTOutput
        return out.logits
    if isinstance(out, dict):
        out = list(out.values())
    for item in out:
        if isinstance(item, Tensor) and item.ndim == 2 and item.shape[0] == batch:
            return item
    raise TypeError(f"cannot find (B={batch}, classes) logits in the model output {type(out).__name__}")


def make_step(model: nn.Module, x: Tensor, train: bool) -> Callable[[], None]:
    """One call = one eval forward (inference mode) or one train step (forward, cross-entropy, backward)."""
    if not train:
        def forward():
            with torch.inference_mode():
                model(x)
        return forward
    def step():
        logits = logits_of(model(x), x.shape[0]).float()
        target = torch.arange(x.shape[0], device=x.device) % logits.shape[1]
        loss = F.cross_entropy(logits, target)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def time_interleaved(steps: list, repeats: int, warmup: int, device: torch.device,
                     cpu_times: Optional[list] = None) -> list:
    """Per step, `repeats` wall times (s) measured round-robin A B C A B C after `warmup` discarded rounds.

    cpu_times: a list to receive the matching process CPU times (all threads), which a busy shared machine
    disturbs far less than wall time when running with one thread.
    """
    times = [[] for _ in steps]
    cpu = [[] for _ in steps]
    for rnd in range(warmup + repeats):
        for i, step in enumerate(steps):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync(device)
            if rnd >= warmup:
                times[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    if cpu_times is not None:
        cpu_times[:] = cpu
    return times


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory (MiB) allocated during one step above what was allocated before it.

    CUDA: the caching allocator's `max_memory_allocated`. CPU: torch's CPU allocator events recorded by
    `torch.profiler` (profile_memory=True), summed in time order; this counts tensors only (not the malloc arena,
    which resident-set sizes would mix across models, nor tracemalloc, which does not see torch's allocations).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # an op's net allocation is its self_cpu_memory_usage; frees outside any op are "[memory]" events
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak / 2 ** 20


def reducer_time(model: nn.Module, step: Callable[[], None], device: torch.device, calls: int = 3) -> Optional[tuple]:
    """(seconds in the reducer's hooks, total seconds) over `calls` steps, or None for a model without a reducer.

    The hooks (decision, clustering, matching, merging) are timed by wrapping them on the instance; the class
    attention row, computed inside the attention module beside fused SDPA, counts as model time.
    """
    reducer = getattr(model, "reducer", None)
    if reducer is None:
        return None
    spent = [0.0]
    names = ("before_block", "attention_args", "after_attention")

    def timed(fn):
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[0] += time.perf_counter() - t0
            return out
        return wrapper

    for name in names:
        setattr(reducer, name, timed(getattr(reducer, name)))
    try:
        step()  # warm-up
        spent[0] = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync(device)
        total = time.perf_counter() - t0
    finally:
        for name in names:
            delattr(reducer, name)
    return spent[0], total


def train_gmacs(model: nn.Module, x: Tensor) -> float:
    """GMACs per image of one training step (forward + backward), counted under the math attention backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        make_step(model, x, train=True)()
    return counter.get_total_flops() / x.shape[0] / 2e9


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
    model: str  # --model (DiT twins resolved per SPEC)
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
    from .registry import create_model

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
    plans = [resolve(spec, cfg.model) for spec in specs]  # every SPEC validated before anything is built
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
        from .flops import count_gmacs

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
