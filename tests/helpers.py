"""Small configurations and oracles shared by the tests."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bibo_export.cli import main as cli_main
from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.model.moe import normalize_logits

# The command line's processes fork from a server that imported the package once: each still
# starts clean (a process of its own, its own exit status and file descriptors 1 and 2), without
# an interpreter start and `import torch` (about 2 s of a core each, over a hundred cases).
CLI_PROCESSES = multiprocessing.get_context("forkserver")
CLI_PROCESSES.set_forkserver_preload(["bibo_export.cli", "helpers"])
CLI_TIMEOUT_S = 600


def tiny_config(**overrides: Any) -> BiBoConfig:
    """A few-layer BiBo with every feature on (conv router, SSMax, MoE and dense layers)."""
    values: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_routed_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=24, max_position_embeddings=128,
        router_type="conv", mlp_only_layers=[0], bias_update_threshold=800)
    values.update(overrides)
    return BiBoConfig(**values)


# sort-tiny cut to three layers (one dense, two MoE): every kind of layer the preset has, in half
# its export time. Briefly trained, it learns the task as well as the preset's six layers (250
# steps: held-out token accuracy 0.845 vs 0.823, 2026-11-27).
SHORT_SORT_TINY = {"num_hidden_layers": 3}
# The maximum length of the trained sort-tiny's exports: a 12-token prompt and 32 generated
# tokens, with room to spare.
TRAINED_MAX_LENGTH = 48


def run_cli(*args: Any, fresh_interpreter: bool = False, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``bibo-export ARGS`` in a new process and capture what it prints (as text); with
    ``check``, fail the test unless it exits 0.

    ``fresh_interpreter`` runs ``python -m bibo_export.cli`` instead of a forked process: for
    what happens at import time (libraries that warn when imported) and at interpreter exit,
    and for an ``env`` (variables read at import time, such as torch_xla's, need one)."""
    argv = [str(arg) for arg in args]
    if fresh_interpreter or env is not None:
        result = subprocess.run([sys.executable, "-m", "bibo_export.cli", *argv], env=env,
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    else:
        result = run_forked(argv)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def run_forked(argv: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        process = CLI_PROCESSES.Process(target=cli_process, args=(argv, stdout, stderr))
        process.start()
        process.join(CLI_TIMEOUT_S)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"bibo-export {' '.join(argv)} ran over {CLI_TIMEOUT_S} s")
        return subprocess.CompletedProcess(["bibo-export", *argv], process.exitcode,
                                           stdout.read_text(), stderr.read_text())


def cli_process(argv: list[str], stdout: Path, stderr: Path) -> None:
    """The forked process of ``run_cli``: what ``python -m bibo_export.cli ARGV`` does, with its
    output file descriptors sent to files (multiprocessing reports an escaped exception as a
    traceback on stderr and exit status 1, as the interpreter would)."""
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.exit(cli_main(argv))


def swiglu_reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """One expert on one token, written out with plain matrix-vector products."""
    return down @ (F.silu(gate @ x) * (up @ x))


def train_sort_tiny(out_dir: Path, steps: int = 250, length: int = 6, lr: float = 3e-3):
    """Briefly train the 3-layer sort-tiny on the sorting task through the command line (eager
    CPU, seeded), unless ``out_dir`` already holds its final checkpoint (complete once its
    config, written last, is there).

    Returns (final checkpoint folder, SortingTask). Int8 parity is only meaningful on a model
    that has learned something (docs/parity.md), so the export tests share one such model.
    """
    from bibo_export.tasks.sorting import SortingTask
    from bibo_export.train.trainer import TrainConfig  # torch_xla-free, but heavier

    final = out_dir / "final"
    if not (final / "config.json").exists():
        overrides = [arg for key, value in SHORT_SORT_TINY.items()
                     for arg in ("--set", f"{key}={value}")]
        run_cli("train", "--preset", "sort-tiny", *overrides, "--data", f"sort:{length}",
                "--steps", steps, "--batch-size", 32, "--lr", lr, "--device", "cpu",
                "--log-every", 50, "--eval-every", steps, "--checkpoint-every", steps,
                "--out", out_dir, check=True)
    return final, SortingTask(lengths=(length,), batch_size=32, seed=TrainConfig.seed)


def trained_export_command(runtime: str, precision: str,
                           root: Path) -> tuple[str, list[Any], Path]:
    """How the trained sort-tiny's ``runtime`` / ``precision`` export is made (ExecuTorch's
    ``fused-*`` precisions: the program without BiBo's kernels): (the name of the command that
    makes it, the arguments of ``bibo-export export RUNTIME`` that follow the checkpoint, the
    export's folder). ONNX writes fp32, int8 and int4 in one command, which traces once;
    ExecuTorch lowers each precision in a command of its own, so that two workers can lower
    two at once."""
    if runtime == "onnx":
        return "onnx", ["--precision", "fp32,int8,int4", "--out", root / "onnx"], \
            root / "onnx" / precision
    experts, _, dtype = precision.rpartition("-")
    out = root / runtime / (experts or "selected")
    flags = ["--experts", experts] if experts else []
    return f"{runtime}-{precision}", [*flags, "--precision", dtype, "--out", out], out / dtype


# Two correct fp32 programs differ in the last bits (about 1e-6 of the logits), so where a
# token's k-th and (k+1)-th selection scores are closer than that they may choose different
# experts: an unbounded difference that says nothing about either. Parity prompts keep clear.
ROUTING_TIE = 1e-5


def selection_scores(model: BiBoForCausalLM, ids: np.ndarray) -> list[torch.Tensor]:
    """Per MoE layer of ``model``, the selection scores z̃ + b that its top-k chose from, for
    every token of ``ids`` [B, T]: [B·T, n] each, captured by hooks on the routers."""
    scores = []

    def capture(moe):
        def hook(_router, _inputs, output):
            z = normalize_logits(output[0], model.config.router_lambda) + moe.expert_bias
            scores.append(z.reshape(-1, z.shape[-1]))
        return hook

    handles = [moe.router.register_forward_hook(capture(moe)) for moe in model.moe_layers]
    try:
        with torch.no_grad():
            model(torch.from_numpy(ids))
    finally:
        for handle in handles:
            handle.remove()
    return scores


def tie_gaps(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per token, the gap between its k-th and (k+1)-th selection score (inf where k = n)."""
    if scores.shape[-1] <= top_k:
        return torch.full(scores.shape[:1], float("inf"))
    top = scores.topk(top_k + 1, dim=-1).values
    return top[:, -2] - top[:, -1]


def routing_margin(model: BiBoForCausalLM, ids: np.ndarray) -> float:
    """The smallest gap between the k-th and the (k+1)-th selection score (z̃ + b) of any token
    of ``ids`` [B, T] in any MoE layer of ``model`` (inf where k = n)."""
    gaps = [tie_gaps(scores, model.config.num_experts_per_tok).min()
            for scores in selection_scores(model, ids)]
    return float(min(gaps, default=float("inf")))


def untied_prompt(model: BiBoForCausalLM, length: int, seed: int, new_tokens: int = 0,
                  batch: int = 1) -> np.ndarray:
    """Seeded random token ids [batch, length], drawn again until neither the prompt nor its
    greedy continuation of ``new_tokens`` (what a parity test compares) has a token within
    ``ROUTING_TIE`` of a routing tie under ``model``."""
    from bibo_export.runtimes.eager import EagerRuntime

    rng, eager = np.random.default_rng(seed), EagerRuntime(model)
    for _ in range(20):
        ids = rng.integers(0, model.config.vocab_size, (batch, length))
        sequence = eager.generate(ids, new_tokens) if new_tokens else ids
        if routing_margin(model, sequence) >= ROUTING_TIE:
            return ids
    raise AssertionError(f"20 random prompts of seed {seed} all sit on a routing tie")


def run_records(run) -> list[dict[str, Any]]:
    """The records a training run logged to its ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def task_accuracy(runtime, task) -> dict[str, float]:
    """Held-out sorting accuracy of a runtime's argmax predictions (any batch size)."""
    from bibo_export.runtimes.base import any_batch

    whole = any_batch(runtime)
    return task.accuracy([whole.logits(ids).argmax(-1) for ids, _ in task.held_out()])


def held_out_logits(runtime, task) -> np.ndarray:
    """A runtime's logits on every held-out set as [1, tokens, vocab], compare_logits' shape."""
    from bibo_export.runtimes.base import any_batch

    whole, vocab = any_batch(runtime), runtime.config.vocab_size
    sets = [whole.logits(ids).reshape(-1, vocab) for ids, _ in task.held_out()]
    return np.concatenate(sets)[None]


def renamed_router_model(config: BiBoConfig, seed: int = 0):
    """A model whose routers sit under another attribute name (``gating``), reached through a
    property: what an innocent refactor of the MoE could do. Exporters must still find them."""
    from bibo_export.model.moe import MoE

    class RenamedRouterMoE(MoE):
        @property
        def router(self):  # noqa: ANN202 - the module registered as "gating"
            return self.gating

    torch.manual_seed(seed)
    model = BiBoForCausalLM(config).eval()
    for moe in model.moe_layers:
        moe._modules["gating"] = moe._modules.pop("router")
        moe.__class__ = RenamedRouterMoE
    return model


def dense_checkpoint(folder: Path) -> Path:
    """Save the smallest BiBo to ``folder``: one layer, dense (no MoE layer), random weights."""
    torch.manual_seed(0)
    BiBoForCausalLM(tiny_config(num_hidden_layers=1, mlp_only_layers=[0])).save_pretrained(folder)
    return folder


def check_failed_export_keeps_previous(export, checkpoint, folder, tmp_path) -> None:
    """Export ``checkpoint`` over a copy of the export ``folder``, verified against a perturbed
    reference: ``export(outs, reference)`` must raise and leave the copy byte for byte as it
    was, with no temporary folder left beside it."""
    import re
    import shutil

    import pytest

    from bibo_export.export.pipeline import ExportVerificationError

    previous = shutil.copytree(folder, tmp_path / "previous")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    perturbed = BiBoForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        perturbed.lm_head.weight.add_(0.05)
    with pytest.raises(ExportVerificationError, match=re.escape("max |Δ logits|")):
        export({"fp32": previous}, perturbed)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def repository_mirror(tmp_path: Path) -> Path:
    """The repository's top level as links, without its runs/ and artifacts/, so make's dry
    runs see the environments and sources but the runs a test puts there."""
    mirror = tmp_path / "repo"
    mirror.mkdir()
    for entry in os.listdir(REPOSITORY_ROOT):
        if entry not in {"runs", "artifacts", "artifacts-text", "build"}:
            (mirror / entry).symlink_to(REPOSITORY_ROOT / entry)
    return mirror


def make_dry_run(mirror: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=mirror,
                          capture_output=True, text=True)


# BiBo's C++ runner: this machine's build (make setup), or the aarch64 one (make setup-aarch64)
# under qemu-user, with a CPU model pinned: qemu's default, "max", also emulates SME, under
# which XNNPACK's int8 kernels returned garbage (qemu 7.2; not seen on hardware). One model
# has ARMv8.2's dot product and one has not, so both int8 paths of the kernels run.
AARCH64_RUNNER = REPOSITORY_ROOT / "build" / "aarch64" / "bin" / "bibo_runner"
ARM_CPUS = {"neoverse-n1": "sdot", "cortex-a53": "neon"}  # CPU model: the int8 path it takes
AARCH64_MISSING = ("the aarch64 runner is not built: `make setup-aarch64` builds it (it "
                   "installs g++-aarch64-linux-gnu and qemu-user with apt-get)")


def runner_target(target: str) -> dict[str, Any]:
    """``run_cpp_runner``'s ``runner`` and ``launcher`` for "native" or an ``ARM_CPUS`` model.
    Where the aarch64 build is missing the test skips, saying what to install; in CI (which
    builds it) it fails instead."""
    if target == "native":
        return {}
    if not AARCH64_RUNNER.is_file() or shutil.which("qemu-aarch64") is None:
        if os.environ.get("CI"):
            pytest.fail(AARCH64_MISSING)
        pytest.skip(AARCH64_MISSING)
    return {"runner": AARCH64_RUNNER,
            "launcher": ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", target]}
