"""The run folder: what a training run writes, and where parity and the report find it.

    RUN/train_config.json      the whole run as data (TrainConfig), written once at its start
    RUN/metrics.jsonl          one JSON object per logged step and per evaluation
    RUN/checkpoints/step-N/    model + training state, the newest few kept (checkpointing.py)
    RUN/final/                 the trained model: config.json + model.safetensors
    RUN/tokenizer.json         text runs: the run's own copy of its tokenizer, which every
                               checkpoint and final/ also hold
    RUN/data/                  text runs: the corpus tokenized once (tokens-KEY.uint16)

``RunFolder.of_checkpoint`` finds the run of ``RUN/final`` or of any ``RUN/checkpoints/step-N``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import TOKENIZER_FILE, TRAIN_CONFIG_FILE
from ..config import parse_json_object
from ..io import atomic_directory, atomic_path, atomic_write_text
from ..model import BiBoForCausalLM
from ..tasks.sorting import SortingTask, parse_sort_spec
from ..tokenizer import TextTokenizer
from .checkpointing import checkpoint_dirs
from .data import make_data_source

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def train_config_path(self) -> Path:
        return self.root / TRAIN_CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def data_cache(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path | None:
        path = self.root / TOKENIZER_FILE
        return path if path.is_file() else None

    def read_tokenizer(self, path: str | Path, fresh: bool) -> TextTokenizer:
        """The run's tokenizer: ``path`` for a run that starts (``fresh``), which training then
        copies into the run; a resumed run reads its own copy, so moving the original later
        changes nothing."""
        return TextTokenizer.from_file(path if fresh or self.tokenizer is None else self.tokenizer)

    def copy_tokenizer(self, folder: Path, source: Path | None = None) -> None:
        """Put the run's tokenizer (or ``source``) into ``folder``; nothing without one."""
        source = source or self.tokenizer
        if source is not None:
            with atomic_path(folder / TOKENIZER_FILE) as tmp:
                shutil.copyfile(source, tmp)

    def save_final(self, model: BiBoForCausalLM) -> None:
        """``final/``: the model and the run's tokenizer, published whole."""
        with atomic_directory(self.final) as folder:
            model.save_pretrained(folder)
            self.copy_tokenizer(folder)

    def latest_checkpoint(self) -> Path | None:
        found = checkpoint_dirs(self.checkpoints)
        return found[-1] if found else None

    def read_train_config(self) -> dict[str, Any]:
        if not self.train_config_path.is_file():
            raise ValueError(f"{self.root} is not a run folder: it has no {TRAIN_CONFIG_FILE}")
        try:
            return parse_json_object(self.train_config_path.read_text())
        except ValueError as err:
            raise ValueError(f"{self.train_config_path}: {err}") from None

    def write_train_config(self, values: dict[str, Any]) -> None:
        atomic_write_text(self.train_config_path, json.dumps(values, indent=2))

    def task(self) -> SortingTask | None:
        """The held-out sorting task the run trained on, or None for other data."""
        values = self.read_train_config()
        lengths = parse_sort_spec(values.get("data", ""))
        return None if lengths is None else SortingTask(lengths=lengths, seed=values["seed"])

    def held_out_text(self, windows: int = 16) -> tuple[np.ndarray, np.ndarray] | None:
        """(input ids, labels), each [windows, sequence_length], of the run's held-out text
        when it trained with a tokenizer; None for other data."""
        values = self.read_train_config()
        if not values.get("tokenizer") or self.tokenizer is None:
            return None
        data = make_data_source(values["data"], windows, values["seed"],
                                values["sequence_length"], TextTokenizer.from_file(self.tokenizer),
                                self.data_cache)
        batch = next(iter(data.eval_batches()), None)
        if batch is None:
            raise ValueError(f"{self.root}: the held-out text fills no {windows} windows")
        return batch[0].numpy(), batch[1].numpy()

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunFolder | None:
        """The run that wrote ``checkpoint`` (``RUN/final`` or ``RUN/checkpoints/step-N``)."""
        checkpoint = Path(checkpoint).resolve()
        for root in (checkpoint.parent, checkpoint.parent.parent):
            run = cls(root)
            if run.train_config_path.is_file() and checkpoint in (
                    run.final, *checkpoint_dirs(run.checkpoints)):
                return run
        return None
