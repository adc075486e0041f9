"""Parity: how far each runtime is from eager PyTorch (docs/parity.md), measured on one set of inputs
and judged by ``verdict``.

``run_parity(checkpoint, artifacts, task)`` takes the checkpoint as the eager reference, loads
every artifact with ``runtimes.load`` and gives one row per runtime: max |Δ logits|, next-token
top-1 agreement, cosine, greedy-token match, task accuracy (with a sorting ``task``) or
held-out perplexity (with ``text``, a language model's held-out windows), prefill latency,
decode tokens/s and size. Each runtime's outputs are computed once and every metric is
derived from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import artifact_bytes
from .runtimes import load
from .runtimes.base import Runtime, any_batch
from .runtimes.eager import EagerRuntime
from .tasks.sorting import SortingTask
from .threads import parallel_jobs, thread_share
from .timing import time_runtime
from .verdict import (ACCURACY_BARS, FP32_MAX_ABS, check_finite_reference,
                      compare_logits, compare_tokens, judge, perplexity)

# The speed columns: one batch-1 prompt, then cached decode steps (medians of a few runs).
SPEED_PROMPT_TOKENS = 64
SPEED_NEW_TOKENS = 16
SPEED_REPEATS = 3
SEED = 0


@dataclass
class ParityInputs:
    """What every runtime is measured on; fixed by the task (or a seed)."""

    logits_sets: list[np.ndarray]  # [N, T] arrays: logits compared at every position
    prompts: np.ndarray  # [n, P]: greedy generation starts (the sorting examples)
    new_tokens: int
    task: SortingTask | None  # task accuracy when the checkpoint learned to sort
    labels: np.ndarray | None = None  # next tokens of a text model's one logits set

    @classmethod
    def build(cls, vocab_size: int, max_length: int, task: SortingTask | None,
              text: tuple[np.ndarray, np.ndarray] | None = None,
              examples: int = 4) -> ParityInputs:
        if task is not None:  # held-out samples: inputs the model was trained to handle
            length = max(task.eval_sets)
            prompts = task.eval_sets[length][:examples, :length + 1]  # values, SEP
            return cls([ids for ids, _ in task.held_out()], prompts, length, task)
        if text is not None:  # held-out windows, cut to what every artifact's cache holds
            ids, labels = (array[:, :max_length] for array in text)
            prompt = max(1, min(16, ids.shape[1] // 2))
            return cls([ids], ids[:examples, :prompt], min(16, max_length - prompt), None,
                       labels)
        rng = np.random.default_rng(SEED)
        length = min(32, max_length)
        prompt = max(1, min(8, max_length // 2))
        return cls([rng.integers(0, vocab_size, (4, length))],
                   rng.integers(0, vocab_size, (examples, prompt)),
                   min(16, max_length - prompt), None)


@dataclass
class Outputs:
    """One runtime's outputs on ``ParityInputs``: every metric is derived from these."""

    logits: list[np.ndarray]  # one [N, T, V] array per logits set
    tokens: np.ndarray  # greedy generation from the prompts

    @classmethod
    def of(cls, runtime: Runtime, inputs: ParityInputs) -> Outputs:
        whole = any_batch(runtime)
        return cls([whole.logits(ids) for ids in inputs.logits_sets],
                   whole.generate(inputs.prompts, inputs.new_tokens))

    def flat_logits(self) -> np.ndarray:
        return np.concatenate([x.reshape(-1, x.shape[-1]) for x in self.logits])


def measure(outputs: Outputs, reference: Outputs, inputs: ParityInputs) -> dict[str, Any]:
    """Parity metrics of ``outputs`` against eager's ``reference`` on the same ``inputs``."""
    row: dict[str, Any] = {**compare_logits(outputs.flat_logits(), reference.flat_logits()),
                           **compare_tokens(outputs.tokens, reference.tokens),
                           "generated": outputs.tokens[:, inputs.prompts.shape[1]:].tolist()}
    if inputs.task is not None:
        row.update(inputs.task.accuracy([x.argmax(-1) for x in outputs.logits]))
    if inputs.labels is not None:
        row["perplexity"] = perplexity(outputs.logits[0], inputs.labels)
    return row


def run_parity(checkpoint: str | Path, artifacts: list[str | Path],
               task: SortingTask | None = None, speed: bool = True,
               log: Callable[[str], None] = print,
               text: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """The parity suite: one row for eager (the reference) and one per artifact. ``text``:
    held-out (input ids, labels) of a language model, for perplexity."""
    checkpoint = Path(checkpoint)
    runtimes = [(Path(path), load(path)) for path in artifacts]  # bad paths fail before any work
    reference = EagerRuntime.from_path(checkpoint)
    reference.max_length = min([r.max_length for _, r in runtimes] + [reference.max_length])
    inputs = ParityInputs.build(reference.config.vocab_size, reference.max_length, task, text)
    speed_prompt = np.random.default_rng(SEED).integers(0, reference.config.vocab_size, (
        1, max(1, min(SPEED_PROMPT_TOKENS, reference.max_length - SPEED_NEW_TOKENS))))
    log(f"[parity] eager fp32: {checkpoint}")
    expected = Outputs.of(reference, inputs)
    check_finite_reference(expected.flat_logits(), str(checkpoint))
    rows = []
    for path, runtime in [(checkpoint, reference), *runtimes]:
        if runtime is not reference:
            log(f"[parity] {runtime.name} {runtime.precision}: {path}")
        outputs = expected if runtime is reference else Outputs.of(runtime, inputs)
        row = {"runtime": runtime.name, "precision": runtime.precision, "path": str(path),
               "bytes": artifact_bytes(path), **measure(outputs, expected, inputs)}
        if speed:
            row.update(time_runtime(runtime, speed_prompt, SPEED_NEW_TOKENS, SPEED_REPEATS))
        rows.append(row)
    for row in rows[1:]:
        if "token_accuracy" in row:
            row["token_accuracy_drop"] = rows[0]["token_accuracy"] - row["token_accuracy"]
        if "perplexity" in row:
            row["perplexity_increase"] = row["perplexity"] / rows[0]["perplexity"] - 1
        row["failed_bars"] = judge(row, row["runtime"], row["precision"], scope="task")
        row["passed"] = not row["failed_bars"]
    return {"checkpoint": str(checkpoint), "task": None if task is None else
            {"kind": "sort", "lengths": list(task.lengths), "seed": task.seed},
            "text": None if text is None else {"windows": list(inputs.logits_sets[0].shape)},
            "prompts": inputs.prompts.tolist(), "new_tokens": inputs.new_tokens,
            "speed": {"prompt_tokens": speed_prompt.shape[1], "new_tokens": SPEED_NEW_TOKENS,
                      "repeats": SPEED_REPEATS, "batch_size": 1, "threads": thread_share(),
                      "parallel_jobs": parallel_jobs()} if speed else None,
            "bars": {"fp32_max_abs": FP32_MAX_ABS, **ACCURACY_BARS},
            "rows": rows, "passed": all(row["passed"] for row in rows[1:])}
