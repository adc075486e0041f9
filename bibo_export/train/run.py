"""The run folder: what a training run writes, and where parity and the report find it.

    RUN/train_config.json      the whole run as data (TrainConfig), written once at its start
    RUN/metrics.jsonl          one JSON object per logged step and per evaluation
    RUN/checkpoints/step-N/    model + training state, the newest few kept (checkpointing.py)
    RUN/final/                 the trained model: config.json + model.safetensors

``RunFolder.of_checkpoint`` finds the run of ``RUN/final`` or of any ``RUN/checkpoints/step-N``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import parse_json_object
from ..io import atomic_write_text
from ..tasks.sorting import SortingTask, parse_sort_spec
from .checkpointing import checkpoint_dirs

TRAIN_CONFIG_FILE = "train_config.json"
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
