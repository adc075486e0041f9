"""Every benchmark's results as one Markdown file: ``bench/results/summary.md``.

Each ``bench/results/NAME.json`` section with ``rows`` becomes a table. The benchmarks already
store ratios to the baseline they measured in the same run (``ratio_vs_loop``,
``speedup_vs_loop``, ``touched_vs_minimum``, ...); runtime tables also get prefill and decode
ratios to their eager fp32 row.
"""

from __future__ import annotations

import json
from typing import Any

from bench.common import RESULTS_DIR, table
from bibo_export.io import atomic_write_text

ORDER = ["dispatch", "train", "onnx", "executorch", "scale"]


def with_eager_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    eager = next((r for r in rows if str(r.get("runtime", "")).startswith("eager")), None)
    if eager is None or "decode_tok_s" not in eager:
        return rows
    return [{**row, "prefill_vs_eager": row["prefill_ms"] / eager["prefill_ms"],
             "decode_vs_eager": row["decode_tok_s"] / eager["decode_tok_s"]} for row in rows]


def scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns
                    and isinstance(v, (int, float, str, bool)) and v is not None]
    return columns


def summary() -> str:
    parts = ["# Benchmark summary", "",
             "Medians on this machine; every ratio is against a baseline measured in the same "
             "run (the dynamic loop dispatch, eager fp32, the active-parameter minimum).", ""]
    names = sorted(RESULTS_DIR.glob("*.json"), key=lambda p: (
        ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    for path in names:
        for section, payload in json.loads(path.read_text()).items():
            if not isinstance(payload, dict) or not payload.get("rows"):
                continue
            rows = with_eager_ratios(payload["rows"])
            machine = payload.get("machine", {})
            parts += [f"## {path.stem}: {section}", "",
                      f"torch {machine.get('torch', '?')}, {machine.get('threads', '?')} "
                      f"thread(s); source `{path.relative_to(RESULTS_DIR.parent.parent)}`", "",
                      table(rows, scalar_columns(rows)), ""]
    return "\n".join(parts)


def main() -> None:
    if not RESULTS_DIR.is_dir():
        raise SystemExit("no benchmark results yet: run make bench (or one bench-* target)")
    path = RESULTS_DIR / "summary.md"
    atomic_write_text(path, summary())
    print(path.read_text())
    print(f"summary: {path}")


if __name__ == "__main__":
    main()
