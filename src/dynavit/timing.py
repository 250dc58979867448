"""Timing primitives shared by `dynavit bench`, the training summary, the demo and the benchmark scripts.

Models are timed side by side: one step per model per round, round-robin (A B C A B C ...), warm-up rounds
discarded, the device synchronised around each timed call (docs/measuring.md). On Linux, glibc's default
malloc thresholds make CPU timings swing by up to 35% (page faults); `reexec_with_malloc_tunables` restarts
the process with them raised, which must happen before the process starts allocating.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
REEXEC_GUARD = "DYNAVIT_MALLOC_REEXEC"
REDUCER_HOOKS = ("before_block", "attention_args", "after_attention")


def malloc_tunables_on() -> bool:
    return MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def launched_as(command: str) -> bool:
    """True when this process is `dynavit COMMAND` typed by a user (not a library or test caller)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    launched = prog == "dynavit" or sys.argv[0].endswith(os.path.join("dynavit", "__main__.py"))
    return launched and command in sys.argv[1:]


def reexec_with_malloc_tunables(argv: Sequence[str]) -> None:
    """Replace this process by `sys.executable *argv` with glibc's malloc thresholds raised.

    Returns without doing anything when they are already on, off Linux, or when this process is itself the
    re-executed one (a guard variable), so calling it first thing is always safe.
    """
    if malloc_tunables_on() or os.environ.get(REEXEC_GUARD) or not sys.platform.startswith("linux"):
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES)
    env[REEXEC_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_of(out, batch: int) -> Tensor:
    """The (B, classes) logits in whatever a model returns (a method's training output, a tuple, ...)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):
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
        F.cross_entropy(logits, target).backward()
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


@contextlib.contextmanager
def wrapped_hooks(reducer, wrap: Callable[[str, Callable], Callable]) -> Iterator[None]:
    """Within the block, the reducer's hooks are `wrap(name, hook)` (set on the instance, removed after)."""
    for name in REDUCER_HOOKS:
        setattr(reducer, name, wrap(name, getattr(reducer, name)))
    try:
        yield
    finally:
        for name in REDUCER_HOOKS:
            delattr(reducer, name)


def reducer_time(model: nn.Module, step: Callable[[], None], device: torch.device, calls: int = 3) -> Optional[tuple]:
    """(seconds in the reducer's hooks, total seconds) over `calls` steps, or None for a model without a reducer.

    The hooks (decision, clustering, matching, merging) are timed by wrapping them on the instance; the class
    attention row, computed inside the attention module beside fused SDPA, counts as model time.
    """
    reducer = getattr(model, "reducer", None)
    if reducer is None:
        return None
    spent = [0.0]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[0] += time.perf_counter() - t0
            return out
        return wrapper

    with wrapped_hooks(reducer, timed):
        step()  # warm-up
        spent[0] = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync(device)
        total = time.perf_counter() - t0
    return spent[0], total


def throughput(model: nn.Module, x: Tensor, repeats: int = 3, amp=None) -> float:
    """Inference images / second on batch `x`: eval mode, one warm-up, median of `repeats` timed forwards."""
    was_training = model.training
    model.eval()
    try:
        with amp if amp is not None else contextlib.nullcontext():
            (times,) = time_interleaved([make_step(model, x, train=False)], repeats, 1, x.device)
    finally:
        model.train(was_training)
    return x.shape[0] / sorted(times)[len(times) // 2]
