"""The interface every runtime shares: full-sequence logits and greedy generation on numpy.

Subclasses implement two primitives on already-checked int64 arrays:
``_prefill(ids [B, T]) → logits [B, T, V]``, which starts a new sequence (resets any cache), and
``_decode(ids [B, 1], position) → logits [B, 1, V]``, which continues it. Validation, the greedy
loop and the error messages live here, so every runtime rejects bad input the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..config import BiBoConfig


class Runtime(ABC):
    name: str = "runtime"
    precision: str = "fp32"

    def __init__(self, config: BiBoConfig, max_length: int, batch_size: int | None = None) -> None:
        self.config = config
        self.max_length = max_length  # prompt + generated tokens the cache can hold
        self.batch_size = batch_size  # None: any batch size

    # ------------------------------------------------------------------ public interface
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits: int64 [B, T] → float32 [B, T, V]."""
        ids = self.check_input_ids(input_ids)
        return np.asarray(self._prefill(ids), dtype=np.float32)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding through the cache: [B, T] → [B, T + max_new_tokens]."""
        ids = self.check_input_ids(input_ids, max_new_tokens)
        tokens = [ids]
        logits = self._prefill(ids)
        for step in range(max_new_tokens):
            next_ids = np.asarray(logits)[:, -1].argmax(-1).astype(np.int64)[:, None]
            tokens.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = self._decode(next_ids, ids.shape[1] + step)
        return np.concatenate(tokens, axis=1)

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
    def _prefill(self, input_ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, input_ids: np.ndarray, position: int) -> np.ndarray: ...


class RowByRow(Runtime):
    """Any batch size on a runtime built for batch size 1 (an ExecuTorch program), one row at a
    time; for whole-set metrics, not for speed."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.config, runtime.max_length)
        self.runtime, self.name = runtime, runtime.name

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = self.check_input_ids(input_ids)
        return np.concatenate([self.runtime.logits(row[None]) for row in ids])

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        ids = self.check_input_ids(input_ids, max_new_tokens)
        return np.concatenate([self.runtime.generate(row[None], max_new_tokens) for row in ids])

    def _prefill(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError("RowByRow serves whole calls only")

    def _decode(self, input_ids: np.ndarray, position: int) -> np.ndarray:
        raise NotImplementedError("RowByRow serves whole calls only")


def any_batch(runtime: Runtime) -> Runtime:
    """``runtime`` itself if it takes any batch size, else a row-by-row adapter."""
    return runtime if runtime.batch_size is None else RowByRow(runtime)
