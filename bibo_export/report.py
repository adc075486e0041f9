"""The pipeline's report: parity rows as ``report.md`` + ``report.json``, training as PNG plots.

Plots come from the run's ``metrics.jsonl`` (training loss, held-out accuracy, per-layer expert
load balance, dropped assignments); the table from ``parity.run_parity``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import REPORT_FILE
from .io import atomic_directory, atomic_path
from .tasks.sorting import SEP
from .verdict import describe_bars

# (row key, column header, format); a row without the key shows "–".
COLUMNS = [("runtime", "runtime", "{}"), ("precision", "precision", "{}"),
           ("max_abs", "max abs Δ logits", "{:.2e}"), ("top1_agreement", "top-1 agreement", "{:.2%}"),
           ("cosine", "cosine", "{:.5f}"), ("greedy_match", "greedy tokens", "{}"),
           ("token_accuracy", "sort token acc", "{:.3f}"),
           ("sequence_accuracy", "sort sequence acc", "{:.3f}"),
           ("perplexity", "held-out perplexity", "{:.3f}"),
           ("prefill_ms", "prefill ms", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
           ("bytes", "size MB", "{:.2f}"), ("passed", "bars", "{}")]


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        return "reference" if key == "passed" else "–"
    value = row[key]
    if key == "bytes":
        value /= 1e6
    if key == "greedy_match":
        return "identical" if value else "differ"
    if key == "passed":
        return "pass" if value else "FAIL: " + "; ".join(row["failed_bars"])
    return fmt.format(value)


def speed_conditions(speed: dict[str, Any]) -> str:
    """How the speed columns were timed, and a warning when other jobs of ours ran beside."""
    text = f" with {speed['threads']} thread(s)"
    others = speed["parallel_jobs"] - 1
    if others:
        text += (f", beside {others} other bibo-export job(s) (BIBO_JOBS): slower than on an "
                 "idle machine, so compare them only with each other")
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines)


def sorting_examples(result: dict[str, Any]) -> str:
    """Each held-out prompt, the right answer and what every runtime generated."""
    if result["task"] is None:
        return ""
    lines = ["| prompt (values, SEP) | sorted | " + " | ".join(
        f"{r['runtime']} {r['precision']}" for r in result["rows"]) + " |",
        "|" + "---|" * (2 + len(result["rows"]))]
    for i, prompt in enumerate(result["prompts"]):
        values = [v for v in prompt if v != SEP]
        want = sorted(values)
        outputs = [r["generated"][i] for r in result["rows"]]
        lines.append(f"| {' '.join(map(str, values))} | {' '.join(map(str, want))} | " + " | ".join(
            f"{' '.join(map(str, out))} {'✓' if out == want else '✗'}" for out in outputs) + " |")
    return "\n".join(lines)


def text_examples(result: dict[str, Any], decode: Callable[[list[int]], str]) -> str:
    """Each held-out text prompt and every runtime's greedy continuation, as JSON strings (one
    line each, whitespace visible)."""
    lines = []
    for i, prompt in enumerate(result["prompts"]):
        lines += [f"{i + 1}. prompt {json.dumps(decode(prompt), ensure_ascii=False)}"]
        lines += [f"   - {r['runtime']} {r['precision']}: "
                  f"{json.dumps(decode(r['generated'][i]), ensure_ascii=False)}"
                  for r in result["rows"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval" in r]


def plot_training(metrics: Path, out: Path) -> list[Path]:
    """Four PNGs in ``out``: loss, held-out accuracy (or perplexity), expert load CV per MoE
    layer, dropped-assignment share."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics)
    steps = [r["step"] for r in train]
    eval_steps = [r["step"] for r in evals]
    figures: dict[str, Any] = {}

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in train], label="train")
    ax.plot(eval_steps, [r["eval"]["loss"] for r in evals], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Loss")
    figures["loss.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("token_accuracy", "sequence_accuracy", "perplexity"):
        if evals and key in evals[0]["eval"]:
            ax.plot(eval_steps, [r["eval"][key] for r in evals], "o-", label=key.replace("_", " "))
    ax.set(xlabel="step", title="Held-out evaluation")
    figures["heldout.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = len(train[0]["load_cv"]) if train else 0
    for layer in range(layers):
        ax.plot(steps, [r["load_cv"][layer] for r in train], label=f"MoE layer {layer}")
    ax.set(xlabel="step", ylabel="CV of expert assignment counts",
           title="Expert load balance (0 = perfectly even)")
    figures["expert_load.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [100 * r["drop_rate"] for r in train])
    ax.set(xlabel="step", ylabel="% of assignments dropped", title="Capacity drops")
    figures["drop_rate.png"] = fig

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        if fig.axes[0].get_legend_handles_labels()[0]:
            fig.axes[0].legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


# ------------------------------------------------------------------------------ the report
def write_report(result: dict[str, Any], out: Path, metrics: Path | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> Path:
    """The folder ``out`` with ``report.md``, ``report.json`` and (with ``metrics``)
    ``plots/*.png``, published whole; ``decode`` turns a text model's token ids into text for
    its examples. Returns the path of ``report.md``."""
    with atomic_directory(out) as folder:
        write_report_files(result, folder, metrics, decode)
    return out / "report.md"


def write_report_files(result: dict[str, Any], out: Path, metrics: Path | None,
                       decode: Callable[[list[int]], str] | None) -> None:
    plots = plot_training(metrics, out / "plots") if metrics and metrics.is_file() else []
    (out / REPORT_FILE).write_text(json.dumps({**result, "plots": [
        str(p.relative_to(out)) for p in plots]}, indent=2))
    speed = result["speed"]
    parts = ["# bibo-export report", "",
             f"Checkpoint `{result['checkpoint']}`; every row is compared with eager PyTorch on "
             f"the same inputs (bars: {describe_bars()}; docs/parity.md explains them).", "",
             markdown_table(result["rows"]), ""]
    if speed:
        parts += [f"Speed: batch 1, prefill of {speed['prompt_tokens']} tokens, then "
                  f"{speed['new_tokens'] - 1} cached decode steps; the median prefill of "
                  f"{speed['repeats']} runs and the median of their decode steps, each timed "
                  f"alone, on this machine{speed_conditions(speed)}.", ""]
    verdict = "all bars met" if result["passed"] else "SOME BARS FAILED"
    parts += [f"**Parity: {verdict}.**", ""]
    examples = sorting_examples(result)
    if examples:
        parts += ["## Held-out sorting examples (greedy)", "", examples, ""]
    if result.get("text") and decode is not None:
        parts += ["## Held-out text continuations (greedy)", "", text_examples(result, decode),
                  ""]
    if plots:
        parts += ["## Training", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(parts))
