"""ExecuTorch: run an exported ``.pte`` (XNNPACK delegate + portable kernels) from Python.

The program keeps the KV cache and conv states in mutable buffers that persist between calls
of its ``forward(tokens [1, T], input_pos [1])``, the method ExecuTorch's LLM runner calls; a
call at position 0 starts a new sequence.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# ExecuTorch's attention kernels (llama::custom_sdpa, update_cache), which programs exported by
# earlier versions of bibo-export call: they still run here.
import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
import executorch.kernels.quantized  # noqa: F401 - registers embedding_byte and embedding_4bit
import numpy as np
import torch
from executorch.exir._serialize._program import _get_extended_header
from executorch.extension.pybindings.portable_lib import (_threadpool_get_thread_count,
                                                          _unsafe_reset_threadpool)
from executorch.runtime import Runtime as ETRuntime

from ..artifacts import (ArtifactMetadata, check_manifest, check_program_identifier,
                         program_file)
from ..kernels.library import load_kernels_if_built
from ..threads import thread_share
from .base import ProgramError, Runtime

METADATA_METHOD = "bibo_metadata"  # ArtifactMetadata as UTF-8 JSON bytes (a constant method)
# executorch/runtime/core/error.h: the codes its Python bindings report as "error 0x..".
ERROR_NAMES = {0x01: "Internal", 0x02: "InvalidState", 0x03: "EndOfMethod", 0x04: "AlreadyLoaded",
               0x10: "NotSupported", 0x11: "NotImplemented", 0x12: "InvalidArgument",
               0x13: "InvalidType", 0x14: "OperatorMissing", 0x20: "NotFound",
               0x21: "MemoryAllocationFailed", 0x22: "AccessFailed", 0x23: "InvalidProgram",
               0x24: "InvalidExternalData", 0x25: "OutOfResources",
               0x30: "DelegateInvalidCompatibility", 0x31: "DelegateMemoryAllocationFailed",
               0x32: "DelegateInvalidHandle"}
# Its bindings write the code as "error 0x12" or "error: 0x:20" (both hexadecimal).
ERROR_CODE = re.compile(r"error:? (?:code )?0x:?([0-9a-fA-F]+)")
# What ExecuTorch's log names when a call fails: the operator (method.cpp) or the missing one.
FAILED_OPERATOR = re.compile(r"in operator (\w+(?:::\w+)*(?:\.\w+)?)")
MISSING_OPERATOR = re.compile(r"Missing operator: ([\w:.]+)")


def describe_failure(err: RuntimeError, log: str, action: str, path: Path,
                     hint: str) -> ProgramError:
    """One line from ExecuTorch's exception and the log lines it wrote while failing."""
    code = ERROR_CODE.search(str(err))
    number = int(code.group(1), 16) if code else None
    error = f"{ERROR_NAMES.get(number, 'error')} (0x{number:02x})" if code else \
        (str(err).strip().splitlines() or [type(err).__name__])[0]
    missing = MISSING_OPERATOR.search(log)
    if missing or number == 0x14:
        name = missing.group(1) if missing else "an operator"
        return ProgramError(f"{path} needs {name}, which this process has not registered",
                            f"load BiBo's kernel library (make setup builds it) or re-export "
                            f"with --experts fused{hint}")
    operator = FAILED_OPERATOR.search(log)
    where = f"operator {operator.group(1)} failed with {error}" if operator else error
    advice = ("the file is corrupt or was written by another ExecuTorch version: re-export it"
              if action == "load" else "re-export it with this version of bibo-export")
    return ProgramError(f"ExecuTorch could not {action} {path}: {where}", advice + hint)


@contextlib.contextmanager
def native_log_as_error(log: BinaryIO | None, action: str, path: Path,
                        hint: str = "") -> Iterator[None]:
    """Run an ExecuTorch call with file descriptor 2 sent to ``log``: a failure becomes one
    ``ProgramError`` line built from the exception and those native log lines (which are then
    dropped); after a success they are passed on to stderr unchanged."""
    own = log is None
    log = tempfile.TemporaryFile() if own else log
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        yield
    except RuntimeError as err:
        os.dup2(saved, 2)
        raise describe_failure(err, read_and_clear(log), action, path, hint) from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        written = read_and_clear(log)
        if written:
            os.write(2, written.encode())
        if own:
            log.close()


def read_and_clear(log: BinaryIO) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.seek(0)
    log.truncate()
    return text


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


def share_threads() -> None:
    """Give ExecuTorch's pool this process's share of the cores (bibo_export/threads.py)."""
    if _threadpool_get_thread_count() != thread_share():
        set_threads(thread_share())


class ExecuTorchRuntime(Runtime):
    name = "executorch"

    def __init__(self, method, metadata: ArtifactMetadata,  # noqa: ANN001 - an ET Method
                 path: Path) -> None:
        super().__init__(metadata.config, metadata.max_length, batch_size=metadata.batch_size)
        self.method = method
        self.precision = metadata.precision
        self.path = path
        # Where fd 2 goes during a call (one file for the runtime's life: a call is a token).
        self.native_log = tempfile.TemporaryFile()

    @classmethod
    def from_path(cls, path: str | Path, check: bool = True) -> ExecuTorchRuntime:
        """Load an export folder (checked against its manifest when ``check``) or a ``.pte``
        file; a missing, truncated or foreign program raises a one-line ValueError."""
        path = Path(path)
        if check and path.is_dir():
            check_manifest(path)
        path = program_file(path)
        check_file(path)
        share_threads()
        hint = load_kernels_if_built()
        with native_log_as_error(None, "load", path, hint):
            program = ETRuntime.get().load_program(path)
            names = program.method_names
            if METADATA_METHOD not in names or "forward" not in names:
                raise ValueError(f"{path} is not a bibo-export ExecuTorch program "
                                 f"(methods: {sorted(names)})")
            encoded = program.load_method(METADATA_METHOD).execute([])[0]
            method = program.load_method("forward")
        try:
            text = bytes(encoded.numpy().tolist()).decode()
        except UnicodeDecodeError:
            raise ValueError(f"{path} carries unreadable bibo-export metadata: the file is "
                             "corrupt; re-export it") from None
        return cls(method, ArtifactMetadata.from_json(text, path), path)

    def _run(self, input_ids: np.ndarray, start_pos: int) -> np.ndarray:
        with native_log_as_error(self.native_log, "run", self.path):
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
