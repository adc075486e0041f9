"""Runtimes with one interface: ``load(path).logits(ids)`` and ``.generate(ids, n)``.

``load`` picks the runtime from the artifact's kind (``artifacts.artifact_kind``): a checkpoint
folder (eager PyTorch), an ONNX export folder (ONNX Runtime) or an ExecuTorch export (a folder
with ``model.pte``, or the ``.pte`` itself). The ONNX and ExecuTorch runtimes are imported only
when such an artifact is loaded: each environment has only its own packages (docs/design.md).
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import artifact_kind
from .base import Runtime
from .eager import EagerRuntime


def load(path: str | Path, check: bool = True) -> Runtime:
    """The runtime for ``path``; ``check`` first confirms an export's files against its
    manifest, so a truncated or modified file is reported as such."""
    kind = artifact_kind(path)
    if kind == "checkpoint":
        return EagerRuntime.from_path(path)
    if kind == "onnx":  # onnxruntime exists in the export environment only
        from .onnx import OnnxRuntime
        return OnnxRuntime.from_path(path, check=check)
    from .executorch import ExecuTorchRuntime  # likewise executorch
    return ExecuTorchRuntime.from_path(path, check=check)


__all__ = ["Runtime", "load"]
