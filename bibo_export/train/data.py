"""Training data sources behind one interface, chosen by a spec string.

* ``sort`` / ``sort:6,8``: the sorting task (docs/design.md) at the given lengths;
* ``text:PATH``: a text corpus from a file or a folder, as raw bytes (vocab 256 + EOS = 257),
  or, given a ``tokenizer.json``, as its tokens (tokenized once into a cached token file);
* ``bin:PATH[:uint16|uint32]``: pre-tokenized ids, read by memory map.

Every source gives batch ``i`` as a pure function of (seed, i), so a resumed run sees exactly
the batches an uninterrupted one would, and a fixed held-out set disjoint from training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..tasks.sorting import VOCAB_SIZE as SORT_VOCAB
from ..tasks.sorting import SortingTask, parse_sort_spec
from ..tokenizer import TextTokenizer, corpus_files, tokenize_corpus

BYTE_EOS = 256
BYTE_VOCAB = 257
EVAL_FRACTION = 0.05


class DataSource(Protocol):
    kind: str  # "sort" or "lm": decides the evaluation metrics
    vocab_size: int
    sequence_length: int

    def train_batch(self, index: int) -> tuple[Tensor, Tensor]: ...

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class SortingSource:
    task: SortingTask
    kind: str = "sort"
    vocab_size: int = SORT_VOCAB

    @property
    def sequence_length(self) -> int:
        return self.task.max_sequence_length

    def train_batch(self, index: int) -> tuple[Tensor, Tensor]:
        return self.task.train_batch(index)

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _, input_ids, labels in self.task.eval_batches():
            yield input_ids, labels


class PackedTokens:
    """A token stream cut into fixed windows: random windows from the first 95 % for training,
    consecutive windows of the last 5 % held out."""

    kind = "lm"

    def __init__(self, tokens: np.ndarray, vocab_size: int, sequence_length: int,
                 batch_size: int, seed: int, eval_batches: int = 8) -> None:
        window = sequence_length + 1
        split = int(len(tokens) * (1 - EVAL_FRACTION))
        if split < window * 2 or len(tokens) - split < window:
            raise ValueError(f"corpus too small: {len(tokens)} tokens cannot fill training and "
                             f"held-out windows of {window} tokens")
        self.tokens, self.split = tokens, split
        self.vocab_size, self.sequence_length = vocab_size, sequence_length
        self.batch_size, self.seed = batch_size, seed
        self.num_eval_batches = min(eval_batches,
                                    math.ceil((len(tokens) - split) // window / batch_size))

    def _windows(self, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = np.stack([np.asarray(self.tokens[s:s + self.sequence_length + 1], dtype=np.int64)
                         for s in starts])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def train_batch(self, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, 0, index])
        high = self.split - self.sequence_length - 1
        return self._windows(rng.integers(0, high + 1, size=self.batch_size))

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        window = self.sequence_length + 1
        starts = np.arange(self.split, len(self.tokens) - window + 1, window)
        for b in range(self.num_eval_batches):
            chunk = starts[b * self.batch_size:(b + 1) * self.batch_size]
            if len(chunk) == self.batch_size:  # fixed shapes: a short batch would recompile
                yield self._windows(chunk)


def read_byte_corpus(path: Path) -> np.ndarray:
    """All files under ``path`` (or the file itself) as bytes, documents separated by EOS."""
    pieces = []
    for file in corpus_files(path):
        data = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        if len(data):
            pieces += [data.astype(np.uint16), np.array([BYTE_EOS], dtype=np.uint16)]
    return np.concatenate(pieces)


def read_token_file(path: Path, dtype: str) -> tuple[np.ndarray, int]:
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"token file dtype must be uint16 or uint32, got {dtype!r}")
    if path.stat().st_size == 0 or path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(f"{path} is empty or not a whole number of {dtype} tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return tokens, int(tokens.max()) + 1


def make_data_source(spec: str, batch_size: int, seed: int, sequence_length: int = 256,
                     tokenizer: TextTokenizer | None = None,
                     cache_dir: Path | None = None) -> DataSource:
    """The source ``spec`` names; ``text:`` data with a ``tokenizer`` is tokenized into
    ``cache_dir`` (once: later runs and resumes reuse the token file)."""
    kind, _, rest = spec.partition(":")
    lengths = parse_sort_spec(spec)
    if lengths is not None:
        return SortingSource(SortingTask(lengths=lengths, batch_size=batch_size, seed=seed))
    if kind == "text" and tokenizer is not None:
        if cache_dir is None:
            raise ValueError("tokenized text data needs a cache folder for its token file")
        token_file = tokenize_corpus(rest, tokenizer, cache_dir)
        tokens = read_token_file(token_file, token_file.suffix[1:])[0]
        return PackedTokens(tokens, tokenizer.vocab_size, sequence_length, batch_size, seed)
    if kind == "text":
        if not rest:
            raise ValueError("data path not found: (none given)")
        return PackedTokens(read_byte_corpus(Path(rest)), BYTE_VOCAB, sequence_length,
                            batch_size, seed)
    if kind == "bin":
        path_text, _, dtype = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        path = Path(path_text)
        if not path_text or not path.exists():
            raise ValueError(f"data path not found: {path_text or '(none given)'}")
        tokens, vocab = read_token_file(path, dtype or "uint16")
        return PackedTokens(tokens, vocab, sequence_length, batch_size, seed)
    raise ValueError(f"unknown data spec {spec!r}: use sort[:LENGTHS], text:PATH or "
                     "bin:PATH[:uint16|uint32]")
