import contextlib
import fcntl
import importlib.util
import json
import os

from bibo_export.threads import JOBS_VARIABLE, use_thread_share

# pytest-xdist's workers run side by side: each takes its share of the cores (torch here, ORT
# sessions, ExecuTorch's pool, and the CLI subprocesses the tests start, which inherit it).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(JOBS_VARIABLE, os.environ["PYTEST_XDIST_WORKER_COUNT"])
use_thread_share()

# torch_xla tests run on its CPU backend unless the caller chose a device (a TPU VM).
os.environ.setdefault("PJRT_DEVICE", "CPU")
# There, XLA compiles without LLVM's optimizations: the tests check numbers and graph counts,
# not the speed of the code XLA generates, and compiling is most of their time. A 5-step SPMD
# run of the tiny model took 20 s instead of 34, with the same losses to 1e-6 (2026-11-27).
# Set here, before the XLA runtime starts (below), so that CLI subprocesses inherit it too.
if os.environ["PJRT_DEVICE"] == "CPU":
    os.environ["XLA_FLAGS"] = " ".join(
        ["--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS", "")]).strip()

# Test files of the export env import onnx / executorch at the top. In .venv-xla those packages
# are absent (torch 2.9 cannot hold them) and the files are deselected by their `export` mark
# anyway, so they are not collected there; they run in .venv (make test-export).
collect_ignore = [name for name, package in [("test_onnx.py", "onnx"),
                                             ("test_pipeline.py", "onnx"),
                                             ("test_bad_inputs.py", "onnx"),
                                             ("test_executorch.py", "executorch"),
                                             ("test_executorch_integer.py", "executorch"),
                                             ("test_executorch_bf16.py", "executorch"),
                                             ("test_text.py", "executorch"),
                                             ("test_kernels.py", "executorch"),
                                             ("test_transforms.py", "executorch")]
                  if importlib.util.find_spec(package) is None]

try:
    import torch_xla
except ImportError:  # the export env has no torch_xla; its tests deselect the xla marker
    torch_xla = None

if torch_xla is not None:
    # Start the XLA runtime before any backward of the session: the autograd engine sizes its
    # per-device queues on first use, and an XLA device that appears later trips its assert.
    torch_xla.device()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """A folder all of the run's pytest-xdist workers see: the one above their own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def exclusive(lock_file):
    """Hold ``lock_file``'s lock: what is made under it is made by one worker, once."""
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def trained_sort_tiny(shared_tmp):
    """(checkpoint folder, SortingTask) of a briefly trained sort-tiny, trained once per test
    run: the first worker to ask trains it while the others wait, then they reuse it."""
    from helpers import train_sort_tiny

    with exclusive(shared_tmp / "trained-sort-tiny.lock"):
        return train_sort_tiny(shared_tmp / "trained-sort-tiny")


@pytest.fixture(scope="session")
def trained_export(trained_sort_tiny, shared_tmp):
    """``export(runtime, precision)`` → (checkpoint, task, folder, manifest): the trained
    sort-tiny exported through the command line at ``TRAINED_MAX_LENGTH``, each export made
    once per test run and shared by every test (and worker) that reads it. Tests copy an export
    before they change anything in it. What each command wrote to stderr is kept beside the
    exports, in ``trained-exports/COMMAND.stderr``."""
    from helpers import TRAINED_MAX_LENGTH, run_cli, trained_export_command

    checkpoint, task = trained_sort_tiny
    root = shared_tmp / "trained-exports"

    def export(runtime, precision):
        command, args, folder = trained_export_command(runtime, precision, root)
        with exclusive(shared_tmp / f"trained-export-{command}.lock"):
            if not (folder / "manifest.json").exists():  # written last, when verified
                result = run_cli("export", runtime, "--checkpoint", checkpoint, "--max-length",
                                 TRAINED_MAX_LENGTH, *args, check=True)
                (root / f"{command}.stderr").write_text(result.stderr)  # for test_pipeline
        return checkpoint, task, folder, json.loads((folder / "manifest.json").read_text())

    return export
