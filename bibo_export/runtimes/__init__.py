"""Runtimes with one interface: ``load(path).logits(ids)`` and ``.generate(ids, n)``.

``load`` picks the runtime from what ``path`` is: a checkpoint folder (eager PyTorch), an
exported ONNX folder (ONNX Runtime) or a ``.pte`` file (ExecuTorch).
"""

from __future__ import annotations

from pathlib import Path

from .base import Runtime


def load(path: str | Path) -> Runtime:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model not found: {path}")
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").exists():
        from .eager import EagerRuntime
        return EagerRuntime.from_checkpoint(path)
    if path.is_dir() and (path / "model.onnx").exists():
        from .onnx import OnnxRuntime
        return OnnxRuntime.from_folder(path)
    if path.suffix == ".pte":
        from .executorch import ExecuTorchRuntime
        return ExecuTorchRuntime.from_file(path)
    raise ValueError(f"{path} is neither a checkpoint folder (config.json + model.safetensors), "
                     "an ONNX export folder (model.onnx) nor an ExecuTorch .pte file")


__all__ = ["Runtime", "load"]
