"""ExecuTorch: run an exported ``.pte`` (XNNPACK delegate + portable kernels) from Python.

The program keeps the KV cache and conv states in mutable buffers that persist between calls
of its ``forward(tokens [1, T], input_pos [1])``, the method ExecuTorch's LLM runner calls; a
call at position 0 starts a new sequence.
"""

from __future__ import annotations

from pathlib import Path

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - llama::custom_sdpa
import executorch.kernels.quantized  # noqa: F401 - registers embedding_byte with the runtime
import numpy as np
import torch
from executorch.exir._serialize._program import _get_extended_header
from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
from executorch.runtime import Runtime as ETRuntime

from ..artifacts import (ArtifactMetadata, check_manifest, check_program_identifier,
                         program_file)
from ..kernels.library import load_kernels_if_built
from .base import Runtime

METADATA_METHOD = "bibo_metadata"  # ArtifactMetadata as UTF-8 JSON bytes (a constant method)


def check_file(path: Path) -> None:
    """Catch missing, foreign and truncated files before the ExecuTorch loader sees them: it
    only logs some of these problems, and a later call on such a program can crash."""
    if not path.is_file():
        raise ValueError(f"ExecuTorch program not found: {path}")
    check_program_identifier(path)
    with path.open("rb") as f:
        header = _get_extended_header(f.read(64))
    expected = 0 if header is None else max(header.program_size, header.segment_base_offset
                                             + header.segment_data_size)
    if path.stat().st_size < expected:
        raise ValueError(f"{path} is truncated: {path.stat().st_size} of {expected} bytes")


def set_threads(count: int) -> None:
    """Give ExecuTorch's thread pool, which XNNPACK and the kernels of this process share,
    ``count`` threads (its default: one per core). Only between calls: the pool is rebuilt."""
    if count < 1:
        raise ValueError(f"ExecuTorch needs at least 1 thread, got {count}")
    _unsafe_reset_threadpool(count)


class ExecuTorchRuntime(Runtime):
    name = "executorch"

    def __init__(self, method, metadata: ArtifactMetadata,  # noqa: ANN001 - an ET Method
                 path: Path) -> None:
        super().__init__(metadata.config, metadata.max_length, batch_size=metadata.batch_size)
        self.method = method
        self.precision = metadata.precision
        self.path = path

    @classmethod
    def from_path(cls, path: str | Path, check: bool = True) -> ExecuTorchRuntime:
        """Load an export folder (checked against its manifest when ``check``) or a ``.pte``
        file; a missing, truncated or foreign program raises a one-line ValueError."""
        path = Path(path)
        if check and path.is_dir():
            check_manifest(path)
        path = program_file(path)
        check_file(path)
        hint = load_kernels_if_built()
        try:
            program = ETRuntime.get().load_program(path)
            names = program.method_names
            if METADATA_METHOD not in names or "forward" not in names:
                raise ValueError(f"{path} is not a bibo-export ExecuTorch program "
                                 f"(methods: {sorted(names)})")
            encoded = program.load_method(METADATA_METHOD).execute([])[0]
            text = bytes(encoded.numpy().tolist()).decode()
            method = program.load_method("forward")
        except (RuntimeError, UnicodeDecodeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a loadable ExecuTorch program (truncated or "
                             f"corrupt?): {reason}{hint}") from None
        return cls(method, ArtifactMetadata.from_json(text, path), path)

    def _run(self, input_ids: np.ndarray, start_pos: int) -> np.ndarray:
        outputs = self.method.execute([torch.from_numpy(input_ids),
                                       torch.tensor([start_pos], dtype=torch.long)])
        return outputs[0].numpy()

    # The program's batch is fixed (1 by default): prompts of different lengths run row by row
    # (RowByRow), so padding never reaches it.
    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        return self._run(input_ids, 0)

    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        return self._run(input_ids, position)
