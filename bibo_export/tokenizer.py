"""Text ↔ token ids: a byte-level BPE tokenizer from Hugging Face ``tokenizers``, stored as the
ecosystem's ``tokenizer.json`` (what ExecuTorch's LLM runner and ``transformers`` read).

Byte-level means every UTF-8 byte is a base token, so any text survives encode → decode. One
special token, ``<|endoftext|>``, separates documents in training data and is the model's
end-of-sequence (EOS) id. A corpus is tokenized once into a token file (``bin:`` data's
format) cached beside the run, keyed by the tokenizer's and the corpus files' fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .artifacts import TOKENIZER_FILE
from .io import atomic_directory, atomic_path, file_sha256

END_OF_TEXT = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte tokens and END_OF_TEXT
MAX_VOCAB = (1 << 31) - 1  # ids stay positive 32-bit integers in every runtime
BINARY_SNIFF_BYTES = 8192


def corpus_files(path: str | Path) -> list[Path]:
    """The text files of a corpus, sorted: ``path`` itself, the files under a folder, or the
    files a pattern's last part matches (``/usr/lib/python3.11/*.py``). Binary files found in a
    folder or by a pattern (compiled ``.pyc``, shared libraries) are left out, as git judges
    them: a NUL byte in the first 8 KiB. Such bytes are no text to learn, and would make the
    corpus depend on what happened to be built or cached in the folder."""
    path = Path(path)
    if "*" in path.name:
        found = sorted(p for p in path.parent.glob(path.name) if p.is_file())
        if not found:
            raise ValueError(f"text corpus pattern {path} matches no file")
    elif not path.exists():
        raise ValueError(f"data path not found: {path}")
    else:
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [file for file in found if not is_binary(file)]
    if found and not files:
        raise ValueError(f"text corpus {path} is binary, not text (a NUL byte in the first "
                         f"{BINARY_SNIFF_BYTES // 1024} KiB of every file)")
    if not any(file.stat().st_size for file in files):
        raise ValueError(f"text corpus {path} is empty")
    return files


def is_binary(file: Path) -> bool:
    """Whether ``file`` holds a NUL byte in its first BINARY_SNIFF_BYTES (git's own test)."""
    with file.open("rb") as stream:
        return b"\0" in stream.read(BINARY_SNIFF_BYTES)


def documents(files: list[Path]) -> Iterator[str]:
    """Each non-empty file as one document; bytes that are not UTF-8 become U+FFFD."""
    for file in files:
        text = file.read_bytes().decode("utf-8", errors="replace")
        if text:
            yield text


class TextTokenizer:
    """A loaded ``tokenizer.json`` with the END_OF_TEXT token this project's models stop at."""

    def __init__(self, tokenizer: Tokenizer, path: Path) -> None:
        self.tokenizer, self.path = tokenizer, path
        eos = tokenizer.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"{path} has no {END_OF_TEXT} token: train it with "
                             "`bibo-export tokenizer train`")
        self.eos_id: int = eos

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load ``path`` (a ``tokenizer.json`` or the folder holding one), or raise one line."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"tokenizer not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)), path)
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
            raise ValueError(f"{path} is not a tokenizer.json ({reason})") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens (END_OF_TEXT) are left out."""
        return self.tokenizer.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return file_sha256(self.path)


def train_tokenizer(corpus: str | Path, vocab_size: int, out: str | Path) -> TextTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on a corpus and write
    ``out/tokenizer.json``; the folder ``out`` is published whole. A small corpus may end with
    fewer merges."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or \
            not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"--vocab-size must be an integer in [{MIN_VOCAB}, {MAX_VOCAB:,}] (256 "
                         f"bytes + {END_OF_TEXT}, up to 32-bit signed ids), got "
                         f"{vocab_size!r}")
    files = corpus_files(corpus)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())  # else blank lines
    tokenizer.train_from_iterator(documents(files), trainer, length=len(files))
    with atomic_directory(out) as folder:
        tokenizer.save(str(folder / TOKENIZER_FILE))
    return TextTokenizer.from_file(Path(out) / TOKENIZER_FILE)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenize_corpus(corpus: str | Path, tokenizer: TextTokenizer, cache_dir: Path) -> Path:
    """The corpus as one token file (documents joined by END_OF_TEXT), written once.

    The file's name holds a fingerprint of the tokenizer and of each corpus file's path, size
    and modification time, so a changed corpus or tokenizer is tokenized again.
    """
    files = corpus_files(corpus)
    key = hashlib.sha256(json.dumps(
        [tokenizer.fingerprint()] + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                     for f in files]).encode()).hexdigest()[:16]
    dtype = token_dtype(tokenizer.vocab_size)
    path = cache_dir / f"tokens-{key}.{dtype}"
    if path.is_file():
        return path
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        for text in tqdm(documents(files), total=len(files), desc="tokenize", unit="file",
                         mininterval=1.0):
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            out.write(np.asarray(ids, dtype=dtype).tobytes())
    return path
