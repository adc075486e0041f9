"""BiBo's C++ runner (runner/bibo_runner.cpp) against eager PyTorch: the trained sort-tiny's
programs, default (BiBo's kernels; fp32, int8 and int4) and fused (ExecuTorch's own kernels
only; fp32 and int8), run with no Python on ExecuTorch's released C++ runtime, on this machine
(x86-64) and as an aarch64 build under qemu-user on two pinned CPU models (with and without
ARMv8.2's sdot).

Each comparison runs held-out sorting sequences through the runner (the prefill's logits at
every position) and one greedy generation, against eager's logits and tokens, with the bars of
docs/parity.md.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from helpers import ARM_CPUS, REPOSITORY_ROOT, run_cli, runner_target, untied_prompt

from bibo_export.kernels.library import runner_path
from bibo_export.runtimes import load
from bibo_export.runtimes.cpp_runner import run_cpp_runner
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.verdict import ACCURACY_BARS, FP32_MAX_ABS, compare_logits

pytestmark = pytest.mark.export

PROGRAMS = ["fp32", "int8", "int4", "fused-fp32", "fused-int8"]
TARGETS = ["native", *ARM_CPUS]
# Held-out sequences: for int8 and int4, enough for their bars (384 positions); fp32's bar is a
# maximum difference, which fewer show (emulated Arm runs each prefill at about 1/100 of the
# speed).
HELD_OUT = {"fp32": 8, "int8": 32, "int4": 32}
NEW_TOKENS = 16
OLD_PROGRAM = REPOSITORY_ROOT / "tests" / "fixtures" / "llama-ops-program"


def held_out_sample(task, precision: str) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = task.held_out()[0]
    return ids[:HELD_OUT[precision]], labels[:HELD_OUT[precision]]


def token_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    supervised = labels >= 0
    return float((logits.argmax(-1) == labels)[supervised].mean())


# Every program natively and on the Arm CPU with sdot; on the one without, the default programs
# (BiBo's kernels take their NEON path there; fused programs run ExecuTorch's kernels only).
CASES = [(target, program) for target in TARGETS for program in PROGRAMS
         if target != "cortex-a53" or not program.startswith("fused")]


@pytest.mark.parametrize("target, program", CASES)
def test_the_cpp_runner_computes_what_eager_computes(target, program, trained_export):
    where = runner_target(target)
    checkpoint, task, folder, _ = trained_export("executorch", program)
    eager = EagerRuntime.from_path(checkpoint)
    ids, labels = held_out_sample(task, program.removeprefix("fused-"))
    held = run_cpp_runner(folder, ids.tolist(), 1, logits=True, **where)
    logits = held.logits.reshape(*ids.shape, -1)
    reference = eager.logits(ids)
    delta = compare_logits(logits, reference)
    prompt = untied_prompt(eager.model, 12, seed=1, new_tokens=NEW_TOKENS)
    generated = run_cpp_runner(folder, prompt.tolist(), NEW_TOKENS, **where)
    greedy = eager.generate(prompt, NEW_TOKENS)[0, prompt.shape[1]:].tolist()
    if target != "native":
        assert held.int8_path == ARM_CPUS[target]
    if program.endswith("fp32"):
        assert delta["max_abs"] <= FP32_MAX_ABS["executorch"], delta
        assert generated.tokens == [greedy]
    else:
        bars = ACCURACY_BARS[program.removeprefix("fused-")]
        assert delta["top1_agreement"] >= bars["top1_agreement"], delta
        assert delta["cosine"] >= bars["cosine"], delta
        drop = token_accuracy(reference, labels) - token_accuracy(logits, labels)
        assert drop <= bars["token_accuracy_drop"], drop


@pytest.mark.parametrize("target", TARGETS)
def test_a_program_that_calls_executorchs_llm_ops_is_one_line_naming_the_library(target):
    """A default program exported before attention became BiBo's own kernels calls
    ExecuTorch's llama::custom_sdpa and llama::update_cache, which only a libtorch-linked
    library of ExecuTorch has: the runner says so in one line, naming it."""
    with pytest.raises(ValueError) as failure:
        run_cpp_runner(OLD_PROGRAM / "pte", [[3, 4, 5]], 2, **runner_target(target))
    message = str(failure.value)
    assert "\n" not in message
    assert "llama::custom_sdpa.out" in message and "libcustom_ops_aot_lib.so" in message
    assert "re-export it" in message


def test_a_program_exported_before_the_cache_kernels_still_runs_in_python():
    """The same program in bibo-export's Python runtime, which still loads ExecuTorch's LLM
    ops: it computes what eager computes on the checkpoint it came from."""
    runtime, eager = load(OLD_PROGRAM / "pte"), EagerRuntime.from_path(OLD_PROGRAM / "ckpt")
    ids = untied_prompt(eager.model, 6, seed=3, new_tokens=6)
    delta = compare_logits(runtime.logits(ids), eager.logits(ids))
    assert delta["max_abs"] <= FP32_MAX_ABS["executorch"]
    np.testing.assert_array_equal(runtime.generate(ids, 6), eager.generate(ids, 6))


def test_generate_runs_the_python_runtime_and_the_runner_side_by_side(trained_export):
    """``generate --runner both``: a line per runner, the same greedy tokens as eager in each,
    and each with its timings."""
    checkpoint, _, folder, _ = trained_export("executorch", "fp32")
    eager = EagerRuntime.from_path(checkpoint)
    prompt = untied_prompt(eager.model, 12, seed=2, new_tokens=8)
    greedy = ",".join(map(str, eager.generate(prompt, 8)[0, 12:]))
    result = run_cli("generate", "--model", folder, "--prompt-ids",
                     ",".join(map(str, prompt[0])), "--max-new-tokens", 8, "--runner", "both",
                     check=True)
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["executorch fp32 python",
                                                      "executorch fp32 c++ runner"]
    for line in lines:
        assert f" -> {greedy} (prefill " in line and " tokens/s" in line, line


@pytest.mark.parametrize("args, message", [
    (("--prompt-ids", "3,9999"), "token id 9999 is outside the vocabulary"),
    (("--prompt-ids", "3,x"), "--prompt-ids must be comma-separated non-negative integers"),
    (("--prompt-ids", "3", "--max-new-tokens", "999"), "the program holds"),
    (("--max-new-tokens", "4"), "usage: bibo_runner MODEL.pte --prompt-ids"),
])
def test_bad_input_to_the_runner_is_one_line(trained_export, args, message):
    _, _, folder, _ = trained_export("executorch", "fp32")
    done = subprocess.run([str(runner_path()), str(folder / "model.pte"), *args],
                          capture_output=True, text=True)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
