"""Training checkpoints: everything needed to continue a run exactly.

``OUT/checkpoints/step-000120/`` holds the model (``config.json`` + ``model.safetensors``, so it
loads with ``from_pretrained``), ``optimizer.pt`` (optimizer state and RNG states) and
``state.json`` (the step), and the run's ``tokenizer.json`` when it has one. Each folder is
written whole under a temporary name and renamed, so a crash leaves the previous checkpoints
intact; only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_directory
from ..model import BiBoForCausalLM
from ..model.checkpoint import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def _host(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, tree)


def save_training_checkpoint(root: Path, step: int, model: BiBoForCausalLM,
                             optimizer: torch.optim.Optimizer, keep: int,
                             tokenizer: Path | None = None,
                             extra_rng: dict[str, Any] | None = None) -> Path:
    path = root / f"step-{step:06d}"
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
        torch.save({"optimizer": _host(optimizer.state_dict()),
                    "torch_rng": torch.get_rng_state(), **(extra_rng or {})},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old)
    return path


def load_training_checkpoint(path: Path) -> tuple[BiBoForCausalLM, dict[str, Any], int]:
    """(model on CPU, optimizer.pt contents, step) of one checkpoint folder."""
    model = BiBoForCausalLM.from_pretrained(path)
    try:
        # weights_only: tensors and plain containers only. A run folder may come from someone
        # else, and a full unpickle would run whatever code its optimizer.pt names.
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        step = json.loads((path / "state.json").read_text())["step"]
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path / 'optimizer.pt'} holds more than tensors and plain "
                              f"values; refusing to unpickle it ({reason})") from None
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: training state is unreadable ({err})") from None
    return model, state, step
