"""Wall-clock measurements shared by the benchmarks and the parity report (medians, not means:
these machines are shared and noisy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .runtimes.base import Runtime, greedy_next


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_runtime(runtime: Runtime, prompt: np.ndarray, new_tokens: int,
                 repeats: int) -> dict[str, float]:
    """Prefill latency of ``prompt`` [1, T] and decode tokens/s of the ``new_tokens - 1`` cached
    steps after it, over ``repeats`` greedy generations after an untimed one: the median
    prefill, and the median of every decode step timed alone. A step that the machine delays
    (a thread pool woken late, another process) is then one sample among many; timing whole
    generations and subtracting, as before, let every such delay through in full."""
    if new_tokens < 2:
        raise ValueError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    ids = runtime.check_input_ids(prompt, new_tokens)
    prefills, steps = [], []
    for attempt in range(repeats + 1):
        prefill, decode = timed_generation(runtime, ids, new_tokens)
        if attempt:  # the first warms caches, allocators and thread pools
            prefills.append(prefill)
            steps.extend(decode)
    return {"prefill_ms": statistics.median(prefills) * 1e3,
            "decode_tok_s": 1.0 / statistics.median(steps)}


def timed_generation(runtime: Runtime, ids: np.ndarray,
                     new_tokens: int) -> tuple[float, list[float]]:
    """One greedy generation of ``new_tokens`` from checked ``ids`` [B, T], through the
    runtime's own primitives so that each call is timed alone: (seconds of the prefill,
    seconds of each decode step). Choosing the next token is not timed."""
    start = time.perf_counter()
    logits = runtime._prefill(ids, None)
    prefill = time.perf_counter() - start
    steps = []
    for step in range(new_tokens - 1):
        token = greedy_next(logits)
        start = time.perf_counter()
        logits = runtime._decode(token, ids.shape[1] + step, None)
        steps.append(time.perf_counter() - start)
    return prefill, steps
