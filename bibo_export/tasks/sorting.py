"""The sorting task (docs/design.md): the reference's ablation and the built-in default data.

A sample of length s is s values uniform in 0…254, then SEP = 255, then the same values sorted:
2s+1 tokens. input = sample[:-1]; labels = sample[1:] with the first s labels set to -100, so only
the sorted half is supervised. Batches hold one length at a time (fixed shapes per bucket).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..model.bibo import IGNORE_INDEX

VOCAB_SIZE = 256
SEP = 255
MAX_VALUE = 254
DEFAULT_LENGTHS = (6, 8)


def parse_sort_spec(spec: str) -> tuple[int, ...] | None:
    """The lengths of a ``sort[:LENGTHS]`` data spec (``sort:6,8``), or None for other data."""
    kind, _, rest = spec.partition(":")
    if kind != "sort":
        return None
    try:
        return tuple(int(s) for s in rest.split(",")) if rest else DEFAULT_LENGTHS
    except ValueError:
        raise ValueError(f"bad sorting spec {spec!r}: expected sort:LENGTH[,LENGTH...], "
                         "e.g. sort:6,8") from None


def sorting_sample(rng: np.random.Generator, length: int) -> np.ndarray:
    values = rng.integers(0, MAX_VALUE + 1, size=length)
    return np.concatenate([values, [SEP], np.sort(values)]).astype(np.int64)


def to_inputs_and_labels(samples: np.ndarray) -> tuple[Tensor, Tensor]:
    """[B, 2s+1] samples → input_ids [B, 2s] and labels [B, 2s] (unsorted half ignored)."""
    length = (samples.shape[1] - 1) // 2
    input_ids = torch.from_numpy(samples[:, :-1].copy())
    labels = torch.from_numpy(samples[:, 1:].copy())
    labels[:, :length] = IGNORE_INDEX
    return input_ids, labels


@dataclass
class SortingTask:
    """Seeded sorting data: a fixed held-out set and an endless training stream disjoint from it.

    Training batches cycle through ``lengths`` (one bucket per batch); every batch is full.
    """

    lengths: Sequence[int] = (8, 12, 16)
    batch_size: int = 32
    eval_samples_per_length: int = 128
    seed: int = 48

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"sorting lengths must be positive integers, got {list(self.lengths)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        rng = np.random.default_rng([self.seed, 1])
        self.eval_sets = {s: np.stack([sorting_sample(rng, s)
                                       for _ in range(self.eval_samples_per_length)])
                          for s in self.lengths}
        self._held_out = {row.tobytes() for rows in self.eval_sets.values() for row in rows}

    @property
    def max_sequence_length(self) -> int:
        return 2 * max(self.lengths)

    def train_batches(self, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start_batch``, ``start_batch + 1``, …: batch i depends only on (seed, i),
        so a resumed run sees exactly the batches an uninterrupted run would have."""
        index = start_batch
        while True:
            yield self.train_batch(index)
            index += 1

    def train_batch(self, index: int) -> tuple[Tensor, Tensor]:
        length = self.lengths[index % len(self.lengths)]
        rng = np.random.default_rng([self.seed, 0, index])
        rows = []
        while len(rows) < self.batch_size:
            sample = sorting_sample(rng, length)
            if sample.tobytes() not in self._held_out:
                rows.append(sample)
        return to_inputs_and_labels(np.stack(rows))

    def held_out(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids [N, 2s], labels [N, 2s]) per held-out length, as int64 numpy arrays."""
        return [(ids.numpy(), labels.numpy()) for ids, labels in
                (to_inputs_and_labels(samples) for samples in self.eval_sets.values())]

    def accuracy(self, predictions: list[np.ndarray]) -> dict[str, float]:
        """Token and full-sequence accuracy of predicted ids [N, 2s], one array per held-out
        length in ``held_out`` order, on the supervised (sorted) half."""
        correct = total = rows_correct = rows = 0
        for predicted, (_, labels) in zip(predictions, self.held_out(), strict=True):
            mask = labels != IGNORE_INDEX
            hits = (predicted == labels) & mask
            correct, total = correct + int(hits.sum()), total + int(mask.sum())
            rows_correct += int((hits | ~mask).all(axis=1).sum())
            rows += len(labels)
        return {"token_accuracy": correct / total, "sequence_accuracy": rows_correct / rows}

    def eval_batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(length, input_ids, labels) per held-out bucket, in batches of ``batch_size``."""
        for length, samples in self.eval_sets.items():
            for start in range(0, len(samples), self.batch_size):
                yield (length, *to_inputs_and_labels(samples[start:start + self.batch_size]))

