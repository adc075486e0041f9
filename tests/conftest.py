import fcntl
import importlib.util
import os

# Under pytest-xdist the workers share the cores: give each its share of threads (torch, ORT,
# XNNPACK and the CLI subprocesses read OMP_NUM_THREADS), or they preempt each other's threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

# torch_xla tests run on its CPU backend unless the caller chose a device (a TPU VM).
os.environ.setdefault("PJRT_DEVICE", "CPU")

# Test files of the export env import onnx / executorch at the top. In .venv-xla those packages
# are absent (torch 2.9 cannot hold them) and the files are deselected by their `export` mark
# anyway, so they are not collected there; they run in .venv (make test-export).
collect_ignore = [name for name, package in [("test_onnx.py", "onnx"),
                                             ("test_pipeline.py", "onnx"),
                                             ("test_bad_inputs.py", "onnx"),
                                             ("test_executorch.py", "executorch"),
                                             ("test_executorch_int8.py", "executorch"),
                                             ("test_executorch_bf16.py", "executorch"),
                                             ("test_text.py", "executorch"),
                                             ("test_kernels.py", "executorch")]
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
def trained_sort_tiny(tmp_path_factory):
    """(checkpoint folder, SortingTask) of a briefly trained sort-tiny, trained once per test
    run: pytest-xdist's workers share it through the folder above their own temporary folders,
    the first to ask training it under a lock while the others wait, then reuse it."""
    from helpers import train_sort_tiny

    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    with open(shared / "trained-sort-tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return train_sort_tiny(shared / "trained-sort-tiny")
