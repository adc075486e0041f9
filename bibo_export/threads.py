"""How many compute threads one of our processes takes: its share of the cores.

PyTorch's OpenMP threads spin and wait for each other at every operator. Two processes that
each run as many threads as there are cores make every small operator wait for a descheduled
thread, and eager decoding beside another such process became 50–95× slower. So whatever
starts several of our processes at once (make's parallel export lanes, pytest-xdist's workers)
says how many through ``BIBO_JOBS``, and each process takes ``cores // BIBO_JOBS`` threads; a
lone process takes every core. ``BIBO_THREADS`` sets the count outright.
"""

from __future__ import annotations

import os

import torch

JOBS_VARIABLE = "BIBO_JOBS"
THREADS_VARIABLE = "BIBO_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0))


def positive_setting(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def parallel_jobs() -> int:
    """How many of our processes run side by side (1 unless ``BIBO_JOBS`` says otherwise)."""
    return positive_setting(JOBS_VARIABLE) or 1


def thread_share() -> int:
    """This process's compute threads: ``BIBO_THREADS``, else its share of the cores."""
    return positive_setting(THREADS_VARIABLE) or max(1, available_cores() // parallel_jobs())


def use_thread_share() -> int:
    """Give PyTorch (intra-op and OpenMP) this process's share, and pass it on to the
    libraries and child processes that read ``OMP_NUM_THREADS``. ONNX Runtime's sessions and
    ExecuTorch's thread pool take ``thread_share()`` where our runtimes create them."""
    threads = thread_share()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def use_threads(count: int) -> int:
    """Set this process's count outright (a benchmark's ``--threads``), for every library."""
    os.environ[THREADS_VARIABLE] = str(count)
    return use_thread_share()
