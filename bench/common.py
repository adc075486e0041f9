"""Timing, result files and tables shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bibo_export.io import atomic_write_text
from bibo_export.provenance import provenance

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """Where and with what a section was measured (``bench-publish`` keeps it in snapshots)."""
    return {**provenance(), "threads": torch.get_num_threads()}


def interleaved_medians(measure: Callable[[Any], dict[str, float]], subjects: dict[str, Any],
                        rounds: int) -> dict[str, dict[str, float]]:
    """Per subject, the median of each figure ``measure`` returns, over ``rounds`` rounds that
    each measure every subject once in turn: the machine's drift then hits every row alike,
    where timing one row after another puts it into their ratios."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in subjects}
    for round_index in range(rounds):
        print(f"  timing round {round_index + 1}/{rounds} ...", flush=True)
        for name, subject in subjects.items():
            samples[name].append(measure(subject))
    return {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for name, runs in samples.items()}


def update_results(name: str, section: str, payload: dict[str, Any]) -> Path:
    """Merge ``payload`` under ``section`` of bench/results/NAME.json (other sections kept)."""
    path = RESULTS_DIR / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = payload
    atomic_write_text(path, json.dumps(results, indent=2))
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
