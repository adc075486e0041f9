"""Parity: how far each runtime is from eager PyTorch (DESIGN §7), measured and judged.

``run_parity(checkpoint, artifacts)`` takes the checkpoint as the eager reference, loads every
artifact with ``runtimes.load`` and gives one row per artifact: max |Δ logits|, next-token
top-1 agreement, cosine, greedy-token match, sorting accuracy (when the checkpoint was trained
on the sorting task), prefill latency, decode tokens/s and size. ``failed_bars`` names every
DESIGN §7 bar a row misses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runtimes.base import Runtime, any_batch
from .train.sorting import SortingTask, to_inputs_and_labels

# DESIGN §7, by comparison.
BARS: dict[str, dict[str, float]] = {
    "onnx-fp32": {"max_abs": 1e-4},
    "executorch-fp32": {"max_abs": 1e-3},
    "int8": {"top1_agreement": 0.98, "cosine": 0.99, "token_accuracy_drop": 0.01},
}
# The speed columns: one batch-1 prompt, then cached decode steps (medians of a few runs).
SPEED_PROMPT_TOKENS = 64
SPEED_NEW_TOKENS = 16
SPEED_REPEATS = 3
SEED = 0


def compare_logits(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max |Δ|, next-token top-1 agreement and mean per-position cosine of two [B, T, V] arrays."""
    if candidate.shape != reference.shape:
        raise ValueError(f"logits shapes differ: {candidate.shape} vs {reference.shape}")
    a = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return {"max_abs": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "cosine": float(cosine.mean())}


def compare_generation(candidate: Runtime, reference: Runtime, prompts: np.ndarray,
                       max_new_tokens: int) -> dict[str, Any]:
    """Greedy tokens of both runtimes and whether they are identical."""
    got = candidate.generate(prompts, max_new_tokens)
    want = reference.generate(prompts, max_new_tokens)
    return {"greedy_match": bool(np.array_equal(got, want)),
            "greedy_token_agreement": float((got == want).mean())}


def sorting_accuracy(runtime: Runtime, task: SortingTask) -> dict[str, float]:
    """Token and full-sequence accuracy of argmax predictions on the held-out sorting sets."""
    correct = total = seq_correct = seq_total = 0
    for samples in task.eval_sets.values():
        ids, labels = (t.numpy() for t in to_inputs_and_labels(samples))
        predictions = runtime.logits(ids).argmax(-1)
        mask = labels != -100
        hits = (predictions == labels) & mask
        correct += int(hits.sum())
        total += int(mask.sum())
        seq_correct += int((hits | ~mask).all(axis=1).sum())
        seq_total += len(ids)
    return {"token_accuracy": correct / total, "sequence_accuracy": seq_correct / seq_total}


# ------------------------------------------------------------------------------ the suite
@dataclass
class ParityInputs:
    """What every runtime is measured on; fixed by the checkpoint's task and a seed."""

    logits_sets: list[np.ndarray]  # [N, T] arrays: logits compared at every position
    prompts: np.ndarray  # [n, P]: greedy generation starts (the sorting examples)
    new_tokens: int
    task: SortingTask | None  # sorting accuracy when the checkpoint learned to sort

    @classmethod
    def build(cls, vocab_size: int, max_length: int, task: SortingTask | None,
              examples: int = 4) -> ParityInputs:
        if task is not None:  # held-out samples: inputs the model was trained to handle
            sets = [samples[:, :-1] for samples in task.eval_sets.values()]
            length = max(task.eval_sets)
            prompts = task.eval_sets[length][:examples, :length + 1]  # values, SEP
            return cls(sets, prompts, length, task)
        rng = np.random.default_rng(SEED)
        length = min(32, max_length)
        prompt = max(1, min(8, max_length // 2))
        return cls([rng.integers(0, vocab_size, (4, length))],
                   rng.integers(0, vocab_size, (examples, prompt)),
                   min(16, max_length - prompt), None)


def task_of(checkpoint: Path, data: str | None) -> SortingTask | None:
    """The held-out sorting task of ``data`` (a ``sort[:LENGTHS]`` spec), or of the training run
    that wrote ``checkpoint`` (``RUN/final`` beside ``RUN/train_config.json``); None otherwise."""
    from .train.data import make_data_source
    from .train.trainer import TrainConfig

    seed = TrainConfig.seed  # the dataclass default, as a run without --seed used
    if data is None:
        # RUN/final, or RUN/checkpoints/step-N
        for folder in (checkpoint.parent, checkpoint.parent.parent):
            saved = folder / "train_config.json"
            if saved.is_file():
                values = json.loads(saved.read_text())
                data, seed = values.get("data"), values.get("seed", seed)
                break
    if data is None or not data.startswith("sort"):
        return None
    return make_data_source(data, batch_size=1, seed=seed).task


def artifact_bytes(path: Path) -> int:
    """A file's size, or a folder's model files (checkpoint weights, ONNX graph + data)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model")
               and p.is_file())


def set_logits(runtime: Runtime, inputs: ParityInputs) -> np.ndarray:
    """Logits [positions, V] of every logits set of ``inputs``, one after the other."""
    return np.concatenate([runtime.logits(ids).reshape(-1, runtime.config.vocab_size)
                           for ids in inputs.logits_sets])


def reference_outputs(reference: Runtime, inputs: ParityInputs) -> dict[str, np.ndarray]:
    """Eager's logits and greedy tokens on ``inputs``, computed once per suite."""
    return {"logits": set_logits(reference, inputs),
            "tokens": reference.generate(inputs.prompts, inputs.new_tokens)}


def measure(runtime: Runtime, reference: dict[str, np.ndarray], inputs: ParityInputs,
            speed_prompt: np.ndarray | None = None) -> dict[str, Any]:
    """Every parity metric of ``runtime`` against eager's ``reference_outputs`` on ``inputs``,
    and its speed on ``speed_prompt`` when given."""
    whole = any_batch(runtime)
    tokens = whole.generate(inputs.prompts, inputs.new_tokens)
    row: dict[str, Any] = {**compare_logits(set_logits(whole, inputs)[None],
                                            reference["logits"][None]),
                           "greedy_match": bool(np.array_equal(tokens, reference["tokens"])),
                           "generated": tokens[:, inputs.prompts.shape[1]:].tolist()}
    if inputs.task is not None:
        row.update(sorting_accuracy(whole, inputs.task))
    if speed_prompt is not None:
        from .timing import time_runtime

        row.update(time_runtime(runtime, speed_prompt, SPEED_NEW_TOKENS, SPEED_REPEATS))
    return row


def failed_bars(row: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The DESIGN §7 bars ``row`` misses, each as one readable clause."""
    failures = []
    if row["precision"] == "int8":
        bars = BARS["int8"]
        if row["top1_agreement"] < bars["top1_agreement"]:
            failures.append(f"top-1 agreement {row['top1_agreement']:.4f} < "
                            f"{bars['top1_agreement']}")
        if row["cosine"] < bars["cosine"]:
            failures.append(f"cosine {row['cosine']:.4f} < {bars['cosine']}")
        if "token_accuracy" in row:
            drop = reference["token_accuracy"] - row["token_accuracy"]
            if drop > bars["token_accuracy_drop"]:
                failures.append(f"sorting token accuracy {drop:.4f} below eager > "
                                f"{bars['token_accuracy_drop']}")
        return failures
    bar = BARS.get(f"{row['runtime']}-fp32", {"max_abs": 0.0})["max_abs"]
    if row["max_abs"] > bar:
        failures.append(f"max |Δ logits| {row['max_abs']:.2e} > {bar:.0e}")
    if not row["greedy_match"]:
        failures.append("greedy tokens differ from eager")
    return failures


def run_parity(checkpoint: str | Path, artifacts: list[str | Path], data: str | None = None,
               speed: bool = True, log=print) -> dict[str, Any]:  # noqa: ANN001 - a printer
    """The parity suite: one row for eager (the reference) and one per artifact."""
    from .runtimes import load
    from .runtimes.eager import EagerRuntime

    checkpoint = Path(checkpoint)
    runtimes = [(Path(path), load(path)) for path in artifacts]  # bad paths fail before any work
    max_length = min([r.max_length for _, r in runtimes] or [512])
    reference = EagerRuntime.from_checkpoint(checkpoint)
    reference.max_length = min(max_length, reference.max_length)
    task = task_of(checkpoint, data)
    inputs = ParityInputs.build(reference.config.vocab_size, reference.max_length, task)
    speed_prompt = np.random.default_rng(SEED).integers(0, reference.config.vocab_size, (
        1, max(1, min(SPEED_PROMPT_TOKENS, reference.max_length - SPEED_NEW_TOKENS))))
    expected = reference_outputs(reference, inputs)
    rows = []
    for path, runtime in [(checkpoint, reference), *runtimes]:
        log(f"[parity] {runtime.name} {runtime.precision}: {path}")
        row = {"runtime": runtime.name, "precision": runtime.precision, "path": str(path),
               "bytes": artifact_bytes(path),
               **measure(runtime, expected, inputs, speed_prompt if speed else None)}
        rows.append(row)
    for row in rows[1:]:
        row["failed_bars"] = failed_bars(row, rows[0])
        row["passed"] = not row["failed_bars"]
    return {"checkpoint": str(checkpoint), "task": None if task is None else
            {"kind": "sort", "lengths": list(task.lengths), "seed": task.seed},
            "prompts": inputs.prompts.tolist(), "new_tokens": inputs.new_tokens,
            "speed": {"prompt_tokens": speed_prompt.shape[1], "new_tokens": SPEED_NEW_TOKENS,
                      "repeats": SPEED_REPEATS, "batch_size": 1} if speed else None,
            "bars": BARS, "rows": rows, "passed": all(row["passed"] for row in rows[1:])}
