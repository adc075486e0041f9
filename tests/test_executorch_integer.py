"""ExecuTorch int8 ("8da8w" on XNNPACK) and int4 ("8da4w") on a briefly trained sort-tiny:
parity bars, size, what is delegated. Their parity is only meaningful on a trained model
(docs/parity.md)."""

from __future__ import annotations

import pytest

from helpers import held_out_logits, task_accuracy

from bibo_export.config import BiBoConfig
from bibo_export.runtimes import load
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.verdict import ACCURACY_BARS, compare_logits

pytestmark = pytest.mark.export


@pytest.fixture(scope="module", params=["int8", "int4"])
def trained_integer(request, trained_export):
    return trained_export("executorch", request.param)


def test_integer_parity_on_trained_model(trained_integer):
    checkpoint, task, out, manifest = trained_integer
    bars = ACCURACY_BARS[manifest["precision"]]
    program, eager = load(out), EagerRuntime.from_path(checkpoint)
    delta = compare_logits(held_out_logits(program, task), held_out_logits(eager, task))
    assert delta["top1_agreement"] >= bars["top1_agreement"]
    assert delta["cosine"] >= bars["cosine"]
    accuracy = task_accuracy(program, task)["token_accuracy"]
    reference = task_accuracy(eager, task)["token_accuracy"]
    assert reference > 0.5  # the model learned something, so the comparison means something
    assert abs(accuracy - reference) <= bars["token_accuracy_drop"]


def test_integer_programs_are_smaller(trained_integer):
    """int8 program at most 0.35 of the fp32 weights it came from, int4 at most 0.20; an fp32
    program is those weights plus a few hundred kB (33.45 vs 33.18 MB on sort-tiny)."""
    checkpoint, _, path, manifest = trained_integer
    fp32_weights = (checkpoint / "model.safetensors").stat().st_size
    bound = {"int8": 0.35, "int4": 0.20}[manifest["precision"]]
    assert (path / "model.pte").stat().st_size <= bound * fp32_weights


def test_integer_programs_delegate_quantized_linears_and_keep_router_float(trained_integer):
    checkpoint, _, out, record = trained_integer
    config = BiBoConfig.from_file(checkpoint / "config.json")
    moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    dense_layers = len(config.mlp_only_layers)
    # Every Linear but the router: attention 4, dense SwiGLU 3, the shared expert 3 per MoE
    # layer (conv-as-Linear, up, down), the LM head; the routed experts are one int8 kernel
    # call per MoE layer.
    expected = 4 * config.num_hidden_layers + 3 * dense_layers + moe_layers * 3 + 1
    assert record["ops"]["quantized_linears"] == expected
    assert record["ops"]["portable_by_op"][f"bibo.moe_experts_{record['precision']}"] == \
        moe_layers
    # The float linears are the export form's products with constants, none with a weight of
    # the model: the mean of squares of every RMSNorm (input, post-attention, q and k per
    # layer, the final norm) and RoPE's half rotation of q and k.
    assert record["ops"]["float_linears"] == 4 * config.num_hidden_layers + 1 \
        + 2 * config.num_hidden_layers
    # sort-tiny's router is a Conv1d: it stays a float convolution, one per MoE layer.
    assert record["ops"]["delegated_by_op"].get("aten.convolution", 0) \
        + record["ops"]["portable_by_op"].get("aten.convolution", 0) == moe_layers

    # The serialized program itself: what is left outside XNNPACK holds no matmul and no
    # (de)quantization, so every quantized linear runs inside the delegate.
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary((out / "model.pte").read_bytes()).program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    assert plan.delegates and {d.id for d in plan.delegates} == {"XnnpackBackend"}
    portable = {op.name for op in plan.operators}
    matmuls = {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::convolution"}
    assert not portable & matmuls
    # ... except the embedding lookup, ExecuTorch's own quantized kernel (no fp32 table), of
    # the precision's bits (sort-tiny's width, 256, is a multiple of int4's group).
    quantized = [name for name in portable if "quant" in name or "qparams" in name]
    lookup = {"int8": "embedding_byte", "int4": "embedding_4bit"}[record["precision"]]
    assert quantized == [f"quantized_decomposed::{lookup}"], quantized
    assert "aten::embedding" not in portable  # the float lookup is gone with its table
    assert record["quantized_embeddings"] == 1
