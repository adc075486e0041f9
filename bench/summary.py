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

ORDER = ["dispatch", "train", "onnx", "executorch", "sharing", "scale"]


def with_eager_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    eager = next((r for r in rows if str(r.get("runtime", "")).startswith("eager")), None)
    if eager is None or "decode_tok_s" not in eager:
        return rows
    return [{**row, "prefill_vs_eager": row["prefill_ms"] / eager["prefill_ms"],
             "decode_vs_eager": row["decode_tok_s"] / eager["decode_tok_s"]}
            if "decode_tok_s" in row else row for row in rows]


def scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns
                    and isinstance(v, (int, float, str, bool)) and v is not None]
    return columns


# The project's goals for CUDA training: MFU of a same-run bf16 matmul, per shape.
CUDA_MFU_GOALS = {"cuda reference 4x1024": 0.35, "cuda reference 8x2048": 0.45,
                  "cuda bench 16x512": 0.20}
HEADLINE_COLUMNS = ["figure", "measured", "baseline (same run)", "goal", "met"]


def headline_row(figure: str, measured: float, goal: float, shown: str, baseline: str,
                 at_most: bool = False) -> dict[str, Any]:
    """One goal: ``measured`` ≥ ``goal`` (≤ with ``at_most``), formatted by ``shown``."""
    met = measured <= goal if at_most else measured >= goal
    return {"figure": figure, "measured": shown.format(measured), "baseline (same run)": baseline,
            "goal": ("≤ " if at_most else "≥ ") + shown.format(goal), "met": "yes" if met else "no"}


def onnx_headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    payload = results.get("onnx", {}).get("bench")
    if not payload:
        return []
    rows = {row["runtime"]: row for row in payload["rows"]}
    fp32, int8 = rows["ort fp32"], rows["ort int8"]
    threads = f"`bench`, batch 1, {payload['threads']} thread(s)"
    kernels = rows.get("ort int8 kernels alone")  # its ceiling: absent from older results
    ceiling = f"; the int8 kernels alone reach {kernels['roofline_share']:.0%}" if kernels else ""
    if "experts_share" in int8:  # absent from older results
        ceiling += f"; its experts (QMoE) take {int8['experts_share']:.0%} of a decode step"
    return [
        headline_row(f"ORT int8 decode vs ORT fp32, {threads}",
                     int8["decode_tok_s"] / fp32["decode_tok_s"], 2.5, "{:.2f}×",
                     f"fp32 {fp32['decode_tok_s']:.1f} tok/s, int8 {int8['decode_tok_s']:.1f}"),
        headline_row(f"ORT int8 decode, share of its memory roofline, {threads}",
                     int8["decode_tok_s"] / int8["roofline_tok_s"], 0.5, "{:.0%}",
                     f"roofline {int8['roofline_tok_s']:.0f} tok/s "
                     f"({payload['copy_bandwidth_gb_s']:.1f} GB/s, "
                     f"{int8['read_mb_per_token']:.1f} MB/token){ceiling}")]


def executorch_headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals for selected experts: programs read ≤ 1.2× the active minimum per decoded token
    and decode int8 ≥ 1.8× as fast as the all-experts (fused) int8 program."""
    payload = results.get("executorch", {}).get("bench")
    rows = {row["runtime"]: row for row in (payload or {}).get("rows", [])}
    selected, fused = rows.get("executorch int8 selected"), rows.get("executorch int8 fused")
    if not (selected and fused):
        return []
    return [
        headline_row("ExecuTorch int8 weight bytes per decoded token vs the active minimum, "
                     "`bench`, selected experts (kernel counter)",
                     selected["touched_vs_minimum"], 1.2, "{:.2f}×",
                     f"fused experts {fused['touched_vs_minimum']:.2f}×", at_most=True),
        headline_row("ExecuTorch int8 decode, selected vs fused experts, `bench`, batch 1",
                     selected["decode_tok_s"] / fused["decode_tok_s"], 1.8, "{:.2f}×",
                     f"fused {fused['decode_tok_s']:.1f} tok/s, selected "
                     f"{selected['decode_tok_s']:.1f}")]


def train_headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    sections = results.get("train", {})
    rows = []
    eager = {row["dispatch"]: row for row in sections.get("eager bench 8x128", {}).get("rows", [])}
    if {"loop", "index"} <= set(eager):
        loop, index = eager["loop"], eager["index"]
        rows.append(headline_row("eager CPU train step, `bench` 8×128: index vs dynamic loop",
                                 index["speedup_vs_loop"], 1.0, "{:.2f}×",
                                 f"loop {loop['tokens_per_s']:.0f} tok/s"))
    for section, goal in CUDA_MFU_GOALS.items():
        if section not in sections:
            continue
        measured = sections[section]["rows"]
        best = max(measured, key=lambda row: row["mfu_of_gemm_peak"])
        # The baseline: the training default (index dispatch) in torch.compile's default mode.
        baseline = next((row for row in measured if row["dispatch"] == "index"
                         and row["compile_mode"] == "default"), None)
        rows.append(headline_row(
            f"CUDA train MFU (of a same-run bf16 matmul), `{section.split()[1]}` "
            f"{section.split()[2]}, {best['dispatch']}, {best['compile_mode']}",
            best["mfu_of_gemm_peak"], goal, "{:.1%}",
            f"index, default mode {baseline['mfu_of_gemm_peak']:.1%}" if baseline else "—"))
    return rows


def headline(results: dict[str, Any]) -> str:
    rows = onnx_headline(results) + executorch_headline(results) + train_headline(results)
    return table(rows, HEADLINE_COLUMNS) if rows else "(no results for the headline figures yet)"


def load_results() -> dict[str, dict[str, Any]]:
    """Every ``bench/results/NAME.json``, by NAME."""
    return {path.stem: json.loads(path.read_text()) for path in RESULTS_DIR.glob("*.json")}


def summary(results: dict[str, dict[str, Any]], title: str = "# Benchmark summary") -> str:
    """The headline figures, then one table per measured section of ``results``."""
    parts = [title, "",
             "Medians on this machine; every ratio is against a baseline measured in the same "
             "run (the dynamic loop dispatch, eager fp32, the active-parameter minimum).", ""]
    parts += ["## Headline figures and their goals", "", headline(results), ""]
    names = sorted(results, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER),
                                              name))
    for name in names:
        for section, payload in results[name].items():
            if not isinstance(payload, dict) or not payload.get("rows"):
                continue
            rows = with_eager_ratios(payload["rows"])
            machine = payload.get("machine", {})
            torch_version = machine.get("versions", {}).get("torch", machine.get("torch", "?"))
            parts += [f"## {name}: {section}", "",
                      f"torch {torch_version}, {machine.get('threads', '?')} thread(s)", "",
                      table(rows, scalar_columns(rows)), ""]
    return "\n".join(parts)


def main() -> None:
    if not RESULTS_DIR.is_dir():
        raise SystemExit("no benchmark results yet: run make bench (or one bench-* target)")
    path = RESULTS_DIR / "summary.md"
    atomic_write_text(path, summary(load_results()))
    print(path.read_text())
    print(f"summary: {path}")


if __name__ == "__main__":
    main()
