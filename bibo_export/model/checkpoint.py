"""The training → export contract: a folder with ``config.json`` and ``model.safetensors``.

Router biases and balancing counters are buffers, so they travel with the weights. These
functions take the model (or its class) as an argument, so the model module can offer them as
``save_pretrained`` / ``from_pretrained`` without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import CONFIG_FILE, WEIGHTS_FILE
from ..config import BiBoConfig, ExecutionOptions, parse_json_object
from ..io import atomic_path, atomic_write_text

Model = TypeVar("Model", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupt or for another model shape."""


def save_checkpoint(model: nn.Module, directory: str | Path) -> None:
    """Write weights then config, each atomically; a tied LM head is stored once."""
    directory = Path(directory)
    state = {name: tensor.detach().to("cpu").contiguous()
             for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_FILE, model.config.to_json())


def load_config(directory: str | Path) -> tuple[BiBoConfig, ExecutionOptions]:
    """The folder's model config, and the execution options that configs written before
    ``ExecutionOptions`` existed still carry (defaults otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {CONFIG_FILE}")
    try:
        return BiBoConfig.from_saved(parse_json_object(config_path.read_text()))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None


def load_checkpoint(cls: type[Model], directory: str | Path, map_location: str = "cpu") -> Model:
    directory = Path(directory)
    config, execution = load_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: it has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or truncated ({err})") from None

    model = cls(config, execution)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not match its {CONFIG_FILE}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model.to(map_location)
