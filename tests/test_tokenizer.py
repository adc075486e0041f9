"""The tokenizer and tokenized text data: bytes survive, the corpus is tokenized as Hugging Face
``tokenizers`` itself tokenizes each document, the cache is reused only while it is valid, and
the model's vocabulary follows the tokenizer (or is refused when it cannot hold it)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from bibo_export.tokenizer import END_OF_TEXT, TextTokenizer, tokenize_corpus, train_tokenizer
from bibo_export.train.data import make_data_source
from bibo_export.train.trainer import TrainConfig

CORPUS = {
    "a.txt": "Les élèves naïfs mangent des crêpes — très bien. " * 200,
    "b.py": "def add(x, y):\n    return x + y  # ÷ ∑ λ\n" * 300,
    "c.md": "日本語のテキストも少し。 Ελληνικά επίσης. " * 100,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_tokenizer(corpus, 400, tmp_path_factory.mktemp("tokenizer"))


def test_text_never_seen_survives_encode_and_decode(tokenizer):
    text = "Zürich 🚀 naïve — 中文 \t\n ∮ E⋅da = Q, \x00 end"  # emoji, CJK, control bytes
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < tokenizer.vocab_size <= 400


def test_end_of_text_is_a_special_token_that_decoding_leaves_out(tokenizer):
    assert tokenizer.tokenizer.id_to_token(tokenizer.eos_id) == END_OF_TEXT
    assert tokenizer.encode(END_OF_TEXT) == [tokenizer.eos_id]
    assert tokenizer.decode(tokenizer.encode("ab") + [tokenizer.eos_id]) == "ab"


def test_corpus_tokens_are_each_document_then_end_of_text(corpus, tokenizer, tmp_path):
    path = tokenize_corpus(corpus, tokenizer, tmp_path)
    oracle = Tokenizer.from_file(str(tokenizer.path))  # the library itself, file by file
    expected = []
    for name in sorted(CORPUS):
        expected += oracle.encode(CORPUS[name]).ids + [oracle.token_to_id(END_OF_TEXT)]
    assert np.fromfile(path, dtype=path.suffix[1:]).tolist() == expected


def test_binary_files_under_a_corpus_folder_are_left_out(corpus, tokenizer, tmp_path):
    """What a build or an interpreter leaves in a source folder is not part of its text."""
    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" * 50)
    (folder / "lib.so").write_bytes(b"\x7fELF" + b"x" * 5000 + b"\0")  # NUL past the start
    with_binaries = tokenize_corpus(folder, tokenizer, tmp_path / "with")
    text_only = tokenize_corpus(corpus, tokenizer, tmp_path / "without")
    assert np.array_equal(np.fromfile(with_binaries, dtype=with_binaries.suffix[1:]),
                          np.fromfile(text_only, dtype=text_only.suffix[1:]))


def test_the_token_cache_is_reused_until_the_corpus_changes(corpus, tokenizer, tmp_path):
    first = tokenize_corpus(corpus, tokenizer, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert tokenize_corpus(corpus, tokenizer, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not written again
    (corpus / "d.txt").write_text("one more document")
    try:
        second = tokenize_corpus(corpus, tokenizer, tmp_path)
        assert second != first
        assert np.fromfile(second, dtype=second.suffix[1:]).size > \
            np.fromfile(first, dtype=first.suffix[1:]).size
    finally:
        (corpus / "d.txt").unlink()


def test_the_model_vocabulary_follows_the_tokenizer_unless_set(corpus, tokenizer, tmp_path):
    data = make_data_source(f"text:{corpus}", 2, 0, 32, tokenizer, tmp_path)
    assert data.vocab_size == tokenizer.vocab_size
    given = dict(preset="text-tiny", data=f"text:{corpus}", tokenizer=str(tokenizer.path))
    assert TrainConfig(**given).model_config_resolved(data.vocab_size).vocab_size == \
        tokenizer.vocab_size
    larger = TrainConfig(**given, model_overrides={"vocab_size": 1000})
    assert larger.model_config_resolved(data.vocab_size).vocab_size == 1000
    smaller = TrainConfig(**given, model_overrides={"vocab_size": 300})
    with pytest.raises(ValueError, match="the tokenizer has .* token ids but the model's "
                                         "vocab_size is 300"):
        smaller.model_config_resolved(data.vocab_size)


def test_a_file_that_is_not_a_tokenizer_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ValueError, match="is not a tokenizer.json"):
        TextTokenizer.from_file(tmp_path)
