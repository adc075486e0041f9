"""Exports run as named stages (prepare → export → quantize → lower → save → verify), each
announced with its duration so a long export shows where it is."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def stage(exporter: str, name: str) -> Iterator[None]:
    print(f"[{exporter}] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"[{exporter}] {name} done in {time.perf_counter() - start:.1f}s", flush=True)
