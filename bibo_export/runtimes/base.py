"""The interface every runtime shares: full-sequence logits and greedy generation on numpy.

Prompts come as an int array [B, T], as a list of id sequences of different lengths, or as a
left-padded array with an ``attention_mask`` (1 = token, 0 = padding). Prompts of different
lengths are left-padded into one batch whose rows each compute what their prompt computes alone
(the model's ``pad`` argument, ``TokenPositions``); results come back in the form given: a list
per row for a list, padded arrays for a mask.

Subclasses implement two primitives on already-checked int64 arrays:
``_prefill(ids [B, T], pad) → logits [B, T, V]``, which starts a new sequence (resets any
cache), and ``_decode(ids [B, 1], position, pad) → logits [B, 1, V]``, which continues it;
``pad`` [B] counts each row's left padding (None: no padding). Validation, the greedy loop and
the error messages live here, so every runtime rejects bad input the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import BiBoConfig

Prompts = np.ndarray | Sequence[Sequence[int]]


class ProgramError(ValueError):
    """A runtime could not load or run an artifact. ``what`` says what failed (which operator,
    with the runtime's error name), ``advice`` what to do; the message is both."""

    def __init__(self, what: str, advice: str) -> None:
        super().__init__(f"{what}; {advice}")
        self.what, self.advice = what, advice


@dataclass
class Batch:
    """Checked prompts as one left-padded int64 array, and how to give results back."""

    ids: np.ndarray  # [B, W]
    pad: np.ndarray | None  # [B] left-padding tokens per row; None when every row is full
    form: str  # "array", "list" or "masked": the form the prompts came in

    def give_back(self, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Per-row results [B, W + n, ...] in the form the prompts came in."""
        if self.form == "list":
            return [row[pad:] for row, pad in zip(rows, self.pad)]
        if self.form == "masked" and rows.dtype.kind == "f":
            rows = rows.copy()
            for row, pad in zip(rows, self.pad):
                row[:pad] = 0.0  # no logits where there was no token
        return rows


class Runtime(ABC):
    name: str = "runtime"
    precision: str = "fp32"

    def __init__(self, config: BiBoConfig, max_length: int, batch_size: int | None = None) -> None:
        self.config = config
        self.max_length = max_length  # prompt + generated tokens the cache can hold
        self.batch_size = batch_size  # None: any batch size

    # ------------------------------------------------------------------ public interface
    def logits(self, input_ids: Prompts,
               attention_mask: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        """Full-sequence logits: int64 [B, T] → float32 [B, T, V] (a list of [T_b, V] for a
        list of prompts)."""
        batch = self.check_prompts(input_ids, attention_mask)
        return batch.give_back(np.asarray(self._prefill(batch.ids, batch.pad), dtype=np.float32))

    def generate(self, input_ids: Prompts, max_new_tokens: int,
                 attention_mask: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        """Greedy decoding through the cache: [B, T] → [B, T + max_new_tokens] (a list of
        prompt + new tokens per row for a list of prompts)."""
        batch = self.check_prompts(input_ids, attention_mask, max_new_tokens)
        ids, pad = batch.ids, batch.pad
        tokens = [ids]
        logits = self._prefill(ids, pad)
        for step in range(max_new_tokens):
            next_ids = greedy_next(logits)
            tokens.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = self._decode(next_ids, ids.shape[1] + step, pad)
        return batch.give_back(np.concatenate(tokens, axis=1))

    def check_prompts(self, input_ids: object, attention_mask: object = None,
                      max_new_tokens: int = 0) -> Batch:
        """Reject what would fail (or silently misbehave) deep inside a runtime; left-pad
        prompts of different lengths."""
        if isinstance(input_ids, np.ndarray):
            if attention_mask is None:
                return Batch(self.check_input_ids(input_ids, max_new_tokens), None, "array")
            pad = left_padding(attention_mask, input_ids.shape)
            ids = np.where(np.asarray(attention_mask) > 0, input_ids, 0)
            checked = self.check_input_ids(ids, max_new_tokens)
            return Batch(checked, pad, "masked")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with an input_ids array, not a list of prompts")
        if not isinstance(input_ids, Sequence) or not input_ids:
            raise ValueError(f"input_ids must be a numpy array or a non-empty list of prompts, "
                             f"got {type(input_ids).__name__}")
        rows = [np.asarray(row) for row in input_ids]
        if any(row.ndim != 1 or len(row) == 0 for row in rows):
            raise ValueError("each prompt must be a non-empty sequence of token ids")
        width = max(len(row) for row in rows)
        ids = np.stack([np.concatenate([np.zeros(width - len(row), row.dtype), row])
                        for row in rows])
        pad = np.array([width - len(row) for row in rows], dtype=np.int64)
        return Batch(self.check_input_ids(ids, max_new_tokens), pad, "list")

    def check_input_ids(self, input_ids: object, max_new_tokens: int = 0) -> np.ndarray:
        """Reject what would fail (or silently misbehave) deep inside a runtime."""
        if not isinstance(input_ids, np.ndarray):
            raise ValueError(f"input_ids must be a numpy array, got {type(input_ids).__name__}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, tokens], got {input_ids.shape}")
        if not np.issubdtype(input_ids.dtype, np.integer):
            raise ValueError(f"input_ids must hold integers, got dtype {input_ids.dtype}")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError("the prompt is empty: input_ids needs at least one token per row")
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"this {self.name} model was exported for batch size "
                             f"{self.batch_size}, got {batch}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if length + max_new_tokens > self.max_length:
            raise ValueError(f"prompt ({length}) + new tokens ({max_new_tokens}) exceeds the "
                             f"maximum length {self.max_length} of this {self.name} model")
        return input_ids.astype(np.int64)

    # ------------------------------------------------------------------ runtime primitives
    @abstractmethod
    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray: ...


def greedy_next(logits: np.ndarray) -> np.ndarray:
    """The argmax token [B, 1] (int64) of each row's last position in ``logits`` [B, T, V]."""
    return np.asarray(logits)[:, -1].argmax(-1).astype(np.int64)[:, None]


def left_padding(attention_mask: object, shape: tuple[int, ...]) -> np.ndarray:
    """Padding tokens per row of a left-padded ``attention_mask`` (zeros, then ones)."""
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {shape}")
    tokens = mask > 0
    pad = (~tokens).sum(-1).astype(np.int64)
    if not (tokens == (np.arange(shape[-1])[None, :] >= pad[:, None])).all():
        raise ValueError("attention_mask must be left padding (zeros, then ones, in every row)")
    if (pad == shape[-1]).any():
        raise ValueError("the prompt is empty: a row of attention_mask has no token")
    return pad


class RowByRow(Runtime):
    """Any batch size on a runtime built for batch size 1 (an ExecuTorch program), one row at a
    time; for whole-set metrics, not for speed. Prompts of different lengths each run alone."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.config, runtime.max_length)
        self.runtime, self.name = runtime, runtime.name

    def logits(self, input_ids: Prompts,
               attention_mask: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        batch = self.check_prompts(input_ids, attention_mask)
        return self._row_by_row(batch, lambda row: self.runtime.logits(row)[0], 0.0)

    def generate(self, input_ids: Prompts, max_new_tokens: int,
                 attention_mask: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        batch = self.check_prompts(input_ids, attention_mask, max_new_tokens)
        return self._row_by_row(batch, lambda row: self.runtime.generate(row, max_new_tokens)[0], 0)

    @staticmethod
    def _row_by_row(batch: Batch, run: Callable[[np.ndarray], np.ndarray],
                    fill: float) -> np.ndarray | list[np.ndarray]:
        pads = batch.pad if batch.pad is not None else np.zeros(len(batch.ids), np.int64)
        rows = [run(ids[pad:][None]) for ids, pad in zip(batch.ids, pads)]
        if batch.form == "list":
            return rows
        width = max(len(row) for row in rows)  # re-pad on the left, as the input was
        return np.stack([np.concatenate([np.full((width - len(row), *row.shape[1:]), fill,
                                                 row.dtype), row]) for row in rows])

    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError("RowByRow serves whole calls only")

    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError("RowByRow serves whole calls only")


def any_batch(runtime: Runtime) -> Runtime:
    """``runtime`` itself if it takes any batch size, else a row-by-row adapter."""
    return runtime if runtime.batch_size is None else RowByRow(runtime)
