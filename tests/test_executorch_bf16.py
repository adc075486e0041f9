"""ExecuTorch bf16 (``--dtype bf16``) on a briefly trained sort-tiny: half the fp32 program,
and its bars against eager fp32 (top-1 ≥ 99 %, cosine ≥ 0.999) on the held-out task."""

from __future__ import annotations

import pytest

from bibo_export.runtimes import load
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.verdict import BF16_BARS, compare_logits, judge
from helpers import held_out_logits

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def bf16_export(trained_export):
    return trained_export("executorch", "bf16")


def test_bf16_meets_its_bars_against_eager_fp32(bf16_export):
    checkpoint, task, out, _ = bf16_export
    row = compare_logits(held_out_logits(load(out), task),
                         held_out_logits(EagerRuntime.from_path(checkpoint), task))
    assert row["top1_agreement"] >= BF16_BARS["top1_agreement"], row
    assert row["cosine"] >= BF16_BARS["cosine"], row
    assert row["max_abs"] > 1e-4, row  # really bf16 arithmetic, not a float32 program
    assert judge(row, "executorch", "bf16", scope="task") == []


def test_bf16_program_is_half_of_fp32(bf16_export):
    checkpoint, _, out, manifest = bf16_export
    fp32_weights = (checkpoint / "model.safetensors").stat().st_size
    size = (out / "model.pte").stat().st_size
    assert 0.45 * fp32_weights <= size <= 0.55 * fp32_weights, (size, fp32_weights)
    assert manifest["precision"] == "bf16" and manifest["verification"]["passed"]
