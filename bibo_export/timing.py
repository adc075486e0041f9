"""Wall-clock measurements shared by the benchmarks and the parity report (medians, not means:
these machines are shared and noisy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .runtimes.base import Runtime


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
    """Prefill latency of ``prompt`` and decode tokens/s of the ``new_tokens - 1`` cached steps
    after it: generate(n) minus generate(1) isolates the decode steps."""
    if new_tokens < 2:
        raise ValueError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    prefill = median_seconds(lambda: runtime.generate(prompt, 1), repeats)
    full = median_seconds(lambda: runtime.generate(prompt, new_tokens), repeats)
    return {"prefill_ms": prefill * 1e3,
            "decode_tok_s": (new_tokens - 1) / max(full - prefill, 1e-9)}
