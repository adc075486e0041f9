"""The compiled kernel library, ``libbibo_kernels.so``, and the C++ runner built with it: where
``make setup`` builds them, how a process loads the library, and the counters it keeps.

Loading the library registers its kernels (``bibo::moe_experts.out``, ``…_int8.out``,
``…_int4.out``, ``bibo::update_cache.out``, ``bibo::cache_attention.out``) with the ExecuTorch
runtime of this process: it links the runtime (``libexecutorch.so``, where the operator registry
lives) that ``executorch.runtime`` and ExecuTorch's LLM runner also link,
and the loader keeps one copy of it per process (same soname). Programs that call these
operators must be loaded afterwards. The C++ runner (``runner/``) links the library instead.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

# make setup builds both here; BIBO_KERNELS_LIB and BIBO_RUNNER point elsewhere (builds of
# your own).
DEFAULT_PATH = Path(__file__).parent / "lib" / "libbibo_kernels.so"
DEFAULT_RUNNER = Path(__file__).parent / "lib" / "bibo_runner"
BUILD_HINT = "build it with `make setup` (needs cmake and a C++ compiler)"

_loaded: ctypes.CDLL | None = None


def library_path() -> Path:
    return Path(os.environ.get("BIBO_KERNELS_LIB", DEFAULT_PATH))


def load_kernels() -> ctypes.CDLL:
    """Load the library once per process; a missing library raises a one-line
    FileNotFoundError that says how to build it."""
    global _loaded
    if _loaded is None:
        path = library_path()
        if not path.is_file():
            raise FileNotFoundError(f"BiBo's ExecuTorch kernel library {path} is missing: "
                                    f"{BUILD_HINT}")
        library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        for name in ("bibo_kernels_weight_bytes_read", "bibo_kernels_experts_run"):
            getattr(library, name).restype = ctypes.c_uint64
        _loaded = library
    return _loaded


def runner_path() -> Path:
    return Path(os.environ.get("BIBO_RUNNER", DEFAULT_RUNNER))


def kernels_available() -> bool:
    return library_path().is_file()


def load_kernels_if_built() -> str:
    """Load the library where it is built, before a program is loaded; returns what to add to
    a load failure's message ("" when the library is loaded, else how to build it)."""
    if not kernels_available():
        return (f" (programs exported with selected experts need BiBo's kernel library "
                f"{library_path()}: {BUILD_HINT})")
    load_kernels()
    return ""


@dataclass(frozen=True)
class KernelCounters:
    """What the kernels touched since the last reset: expert weight bytes (with their scales)
    and experts computed, counted inside the C++ kernels."""

    weight_bytes: int
    experts_run: int


def read_counters(reset: bool = False) -> KernelCounters:
    library = load_kernels()
    counters = KernelCounters(library.bibo_kernels_weight_bytes_read(),
                              library.bibo_kernels_experts_run())
    if reset:
        library.bibo_kernels_reset_counters()
    return counters
