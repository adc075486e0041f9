"""BiBo's C++ runner (``runner/bibo_runner.cpp``) driving an ExecuTorch program: greedy
generation in a process with no Python, on ExecuTorch's released C++ runtime and BiBo's kernel
library, as an app on a device runs it.

``make setup`` builds the runner for this machine beside the kernel library; a cross-built one
(``make setup-aarch64``) runs through a ``launcher`` such as ``qemu-aarch64``. The runner times
its own calls: the prefill, and each decode step alone (the median gives tokens/s), the measure
``timing.time_runtime`` takes of the Python runtimes.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import program_file
from ..kernels.library import BUILD_HINT, runner_path


@dataclass(frozen=True)
class RunnerGeneration:
    """What one run of the runner reports: the new tokens of each prompt, the median prefill and
    decode tokens/s over them. ``logits``: every row its calls computed, when asked for (per
    prompt of T tokens and n new ones, T + n - 1 rows: its positions, then the decode steps)."""

    tokens: list[list[int]]
    prefill_ms: float
    decode_tok_s: float
    threads: int
    int8_path: str  # which int8 dot-product code the kernels chose on this CPU
    logits: np.ndarray | None = None


def run_cpp_runner(model: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   threads: int | None = None, logits: bool = False,
                   runner: Path | None = None,
                   launcher: Sequence[str] = ()) -> RunnerGeneration:
    """Generate ``max_new_tokens`` greedily after each of ``prompts`` (a sequence each) with
    the C++ runner: this machine's build unless ``runner`` names another, run through
    ``launcher``. A failure of the runner raises ValueError with its one-line message."""
    runner = runner or runner_path()
    if not runner.is_file():
        raise FileNotFoundError(f"BiBo's C++ runner {runner} is missing: {BUILD_HINT}")
    program = program_file(Path(model))
    with tempfile.TemporaryDirectory() as scratch:
        rows = Path(scratch) / "logits.f32"
        command = [*launcher, str(runner), str(program), "--max-new-tokens",
                   str(max_new_tokens), "--json",
                   *(arg for prompt in prompts
                     for arg in ("--prompt-ids", ",".join(str(int(i)) for i in prompt))),
                   *(["--threads", str(threads)] if threads else []),
                   *(["--logits", str(rows)] if logits else [])]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise ValueError(f"C++ runner: {lines[-1].removeprefix('error: ')}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        table = np.fromfile(rows, np.float32).reshape(-1, report["vocab"]) if logits else None
    return RunnerGeneration(report["tokens"], report["prefill_ms"], report["decode_tok_s"],
                            report["threads"], report["int8_path"], table)
