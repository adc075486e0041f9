"""Parity metrics: how far a runtime's outputs are from eager PyTorch's (DESIGN §7)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .runtimes.base import Runtime
from .train.sorting import SortingTask, to_inputs_and_labels

# DESIGN §7, by comparison.
BARS: dict[str, dict[str, float]] = {
    "onnx-fp32": {"max_abs": 1e-4},
    "executorch-fp32": {"max_abs": 1e-3},
    "int8": {"top1_agreement": 0.98, "cosine": 0.99, "token_accuracy_drop": 0.01},
}


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
