"""The one place that hides known, harmless noise from the libraries we use, so that every
command of the CLI and every benchmark prints only what someone should read.

Noise comes three ways, and each way has its own list below: Python warnings, logging records,
and lines that native (C/C++) code writes straight to file descriptor 2, out of Python's reach.
To hide a new message, add a named pattern to the right list, with a comment saying why it is
harmless. Anything no pattern matches is shown as before.

This module is the package's bottom layer: it imports only the standard library (it also runs as
a script, the stderr filter process of :func:`filtered_native_stderr`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator

# Python warnings: (message regex matched from its start, category).
# torch 2.13 deprecated pytree's LeafSpec, and torch.export's run_decompositions (run by
# ExecuTorch's to_edge_transform_and_lower) deep-copies old specs, recreating LeafSpecs; the
# export is unaffected. Text: "`isinstance(treespec, LeafSpec)` is deprecated, use
# `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
LEAFSPEC_DEPRECATED = (r".*LeafSpec.* is deprecated", FutureWarning)
# executorch 1.5's emitter says that mutated buffers (our KV cache and conv states) are saved
# without their initial contents. The program never reads those: the call at position 0 zeroes
# the conv states, and attention (its mask, or the cache kernel's causal bound) never reads a
# cache slot not yet written.
MUTABLE_BUFFER_STATE = (r"Mutation on a buffer in the model is detected", UserWarning)
KNOWN_WARNINGS = (LEAFSPEC_DEPRECATED, MUTABLE_BUFFER_STATE)

# Logging records: logger name -> message regexes matched from the message's start.
# `import torchao` tries to load its CUDA-only kernel libraries (torchao/_C*.so) and fails on a
# CPU build of torch; we use none of those kernels.
TORCHAO_CUDA_KERNELS = re.compile(r"Failed to load .*torchao[/\\]_C")
# torchao registers its KernelPreference enum as a pytree constant, which torch now supports
# natively and warns about; nothing changes for us (logged by torch when torchao is imported).
KERNEL_PREFERENCE_ENUM = re.compile(r"<enum 'KernelPreference'> is an Enum subclass")
# torch.onnx's exporter registers torchvision's ONNX translations when it starts and says, once
# per operator, that it skips them where torchvision is absent; our models use none of them.
TORCHVISION_TRANSLATIONS = re.compile(r"torchvision is not installed\. Skipping torchvision::")
KNOWN_LOG_RECORDS = {
    "torchao": (TORCHAO_CUDA_KERNELS,),
    "torch.utils._pytree": (KERNEL_PREFERENCE_ENUM,),
    "torch.onnx._internal.exporter._registration": (TORCHVISION_TRANSLATIONS,),
}

# Native lines written to fd 2: byte regexes searched anywhere in the line.
# ExecuTorch sizes its thread pool by reading ARM core ids (MIDR) from /sys; on x86 those files
# do not exist, so a process's first program load logs its attempts (e.g. "[cpuinfo_utils.cpp:87]
# Failed to open midr file /sys/devices/soc0/image_version") and falls back to the CPU count.
CPUINFO_MIDR_PROBE = re.compile(rb"cpuinfo_utils\.cpp:\d+\] (Reading file |Failed to open midr "
                                rb"file |CPU info and manual query on # of cpus dont match)")
# ExecuTorch's LLM runner logs each step of loading and generating at Info level (e.g. "I
# 08:45:46.866 executorch:llm_runner_helper.cpp:137] Metadata: use_kv_cache = 1", or in the
# short form "[llm_runner_helper.cpp:137] Metadata: ..." that its runtime also prints), and its
# tokenizer library announces its regex engine on load; warnings and errors ("W", "E") still show.
LLM_RUNNER_INFO = re.compile(rb"^(I [\d:. ]*executorch:|\[)(llm_runner_helper|text_llm_runner|"
                             rb"text_prefiller|text_token_generator|stats)\.(cpp|h):\d+\] ")
TOKENIZER_REGEX_INFO = re.compile(rb"^I tokenizers:regex\.cpp:\d+\] Registering override "
                                  rb"fallback regex")
# XLA announces that GSPMD, the partitioner torch_xla's SPMD (our --mesh) runs on, will give
# way to Shardy, once per sharding pass: 84 lines in a 5-step run of a 2-layer model on 4 CPU
# devices (torch_xla 2.9), with nothing for a user to do.
GSPMD_DEPRECATED = re.compile(rb"sharding_propagation\.cc:\d+\] GSPMD sharding propagation is "
                              rb"going to be deprecated")
# ExecuTorch announces each resize of its thread pool, which our runtimes make to give a process
# its share of the cores (bibo_export/threads.py).
THREADPOOL_RESET = re.compile(rb"threadpool\.cpp:\d+\] Resetting threadpool to \d+ threads")
KNOWN_NATIVE_LINES = (CPUINFO_MIDR_PROBE, LLM_RUNNER_INFO, TOKENIZER_REGEX_INFO,
                      GSPMD_DEPRECATED, THREADPOOL_RESET)

# How long the stderr filter holds a line without its newline (a progress bar, a prompt) in case
# the rest follows, before showing it as it is.
PARTIAL_LINE_WAIT_S = 0.05
# How long leaving filtered_native_stderr() waits for the filter process to copy what is left.
# It only runs out when a process we started still holds the pipe; the filter then goes on
# copying until that process exits, so nothing is lost either way.
FILTER_EXIT_WAIT_S = 5.0


def _keep_record(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(pattern.match(message) for pattern in KNOWN_LOG_RECORDS.get(record.name, ()))


def silence_known_noise() -> None:
    """Hide the known harmless Python warnings and log records listed above, which would
    otherwise fill every log and hide what matters. Every other warning and record still
    shows. Call it before torchao and onnxruntime's quantizer are imported (one logs on import,
    the other configures logging on import). Safe to call more than once: it adds no duplicate
    filters or handlers."""
    for message, category in KNOWN_WARNINGS:
        # filterwarnings replaces an identical filter rather than adding a second one.
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_keep_record)  # addFilter skips a filter it has
    keep_default_logging()


def keep_default_logging() -> None:
    """Where the root logger has no handler, give it one that does what Python does then (its
    ``logging.lastResort``: warnings and errors on stderr, the message alone, and only for
    records no other handler took). Output is unchanged, but a library's import-time
    ``logging.basicConfig`` now does nothing: onnxruntime's 8-bit quantizer calls it with level
    INFO, which showed every INFO record of every library for the rest of the process (an int8
    ONNX export of sort-tiny wrote some 700 lines: one or two per graph node, from the
    quantizer and from onnx_ir's passes)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_LastResortHandler())


class _LastResortHandler(logging.Handler):
    """Python's fallback as a handler: records that met no handler below the root go to
    ``logging.lastResort``. Libraries that give their logger a ``NullHandler`` to stay quiet
    (torchao's "Detected no triton" warning) stay quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and not _handled_below_root(record.name):
            logging.lastResort.handle(record)


def _handled_below_root(name: str) -> bool:
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _flush_stderr() -> None:
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def _start_filter() -> tuple[int, subprocess.Popen[bytes]] | None:
    """Start the filter process, writing to a copy of fd 2; None where that cannot work."""
    if sys.platform == "win32":  # select() does not work on pipes there
        return None
    try:
        original = os.dup(2)
    except OSError:  # no fd 2
        return None
    try:
        # -I -S: start fast, importing only the standard library (this file needs no more).
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)],
                                stdin=subprocess.PIPE, stdout=original, stderr=original)
    except OSError:  # no interpreter to start
        os.close(original)
        return None
    return original, proc


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Drop the known native lines listed above from everything written to fd 2 inside the
    block, by native code, Python's ``sys.stderr`` and child processes alike; all other output
    reaches the original stderr unchanged and in order, partial lines included.

    Native code writes to fd 2 directly, so ``warnings`` and ``logging`` cannot see it; fd 2 is
    pointed at a pipe read by a small filter *process* (this file run as a script). A process
    rather than a thread, because a thread needs the GIL to drain the pipe, so native code
    writing a lot while holding the GIL would deadlock, and because a crash (abort, segfault)
    would lose a thread's unread lines, often the very error message, while the filter process
    still delivers them.

    Inside the block fd 2 is a pipe, not a terminal: tools that look (colours, terminal width)
    behave as when stderr is redirected. Where fd 2 cannot be redirected (no fd 2, Windows, no
    interpreter to start) nothing is filtered.
    """
    _flush_stderr()
    started = _start_filter()
    if started is None:
        yield
        return
    original, proc = started
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()  # fd 2 is now the pipe's only write end here, so restoring it ends it
    try:
        yield
    finally:
        _flush_stderr()
        os.dup2(original, 2)
        os.close(original)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(FILTER_EXIT_WAIT_S)


def _is_native_noise(line: bytes) -> bool:
    return any(pattern.search(line) for pattern in KNOWN_NATIVE_LINES)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _copy_filtered(source: int, target: int) -> None:
    """Copy ``source`` to ``target`` until end of file, dropping known native lines. A line
    ends at "\\n" or "\\r" (progress bars redraw with "\\r"); a partial line is shown once no more
    follows within PARTIAL_LINE_WAIT_S, and at the end."""
    pending, done = b"", False
    while not done:
        if pending and not select.select([source], [], [], PARTIAL_LINE_WAIT_S)[0]:
            lines, pending = [pending], b""
        else:
            chunk = os.read(source, 1 << 16)
            done = not chunk
            lines = (pending + chunk).splitlines(keepends=True)
            pending = b"" if done or lines[-1].endswith((b"\n", b"\r")) else lines.pop()
        with contextlib.suppress(OSError):  # stderr closed: keep draining so writers never block
            _write_all(target, b"".join(line for line in lines if not _is_native_noise(line)))


if __name__ == "__main__":  # the filter process started by filtered_native_stderr()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we end at EOF
    _copy_filtered(sys.stdin.fileno(), sys.stdout.fileno())
