"""ExecuTorch export: parity against eager (DESIGN §7), cache resets, int8 delegation, errors.

Each program is exported once per module (fixtures); exports are slow, tests are not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_config

from bibo_export.config import BiBoConfig
from bibo_export.export import executorch as et_export
from bibo_export.export.prepare import inference_copy
from bibo_export.model import BiBoForCausalLM
from bibo_export.parity import BARS, compare_logits, sorting_accuracy
from bibo_export.runtimes import load
from bibo_export.runtimes.base import RowByRow
from bibo_export.runtimes.eager import EagerRuntime

pytestmark = pytest.mark.export

MAX_LENGTH = 48  # a 12-token prompt + 32 generated tokens, with room to spare
NEW_TOKENS = 32


def export_random(tmp_path_factory, name: str, config: BiBoConfig, int8: bool = False):
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp(name) / "checkpoint"
    BiBoForCausalLM(config).save_pretrained(checkpoint)
    out = checkpoint.parent / "model.pte"
    return checkpoint, out, et_export.export_executorch(checkpoint, out, int8=int8,
                                                         max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def sort_tiny_fp32(tmp_path_factory):
    return export_random(tmp_path_factory, "sort-tiny", BiBoConfig.preset("sort-tiny"))


@pytest.fixture(scope="module")
def mlp_router_fp32(tmp_path_factory):
    """The second config: mlp router, other n and k."""
    config = tiny_config(router_type="mlp", num_routed_experts=6, num_experts_per_tok=2,
                         mlp_only_layers=[2])
    return export_random(tmp_path_factory, "mlp-router", config)


@pytest.fixture(scope="module")
def trained_int8(trained_sort_tiny, tmp_path_factory):
    checkpoint, task = trained_sort_tiny
    out = tmp_path_factory.mktemp("int8") / "model_int8.pte"
    record = et_export.export_executorch(checkpoint, out, int8=True,
                                         max_length=MAX_LENGTH)
    return checkpoint, task, out, record


def prompt(vocab_size: int, length: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (1, length))


# ------------------------------------------------------------------------------ fp32 parity
@pytest.mark.parametrize("exported", ["sort_tiny_fp32", "mlp_router_fp32"])
def test_fp32_logits_and_greedy_tokens_match_eager(exported, request):
    checkpoint, out, _ = request.getfixturevalue(exported)
    runtime, eager = load(out), EagerRuntime.from_checkpoint(checkpoint)
    ids = prompt(runtime.config.vocab_size)
    delta = compare_logits(runtime.logits(ids), eager.logits(ids))
    assert delta["max_abs"] <= BARS["executorch-fp32"]["max_abs"]
    np.testing.assert_array_equal(runtime.generate(ids, NEW_TOKENS),
                                  eager.generate(ids, NEW_TOKENS))


def test_decode_steps_match_full_forward(sort_tiny_fp32):
    """Every cached decode step's logits equal eager's full forward over the whole sequence."""
    checkpoint, out, _ = sort_tiny_fp32
    runtime = load(out)
    model = inference_copy(BiBoForCausalLM.from_pretrained(checkpoint))
    ids = prompt(runtime.config.vocab_size, length=8)
    tokens = runtime.generate(ids, 8)
    with torch.no_grad():
        full = model(torch.from_numpy(tokens)).logits.numpy()
    runtime.logits(tokens[:, :8])
    for position in range(8, tokens.shape[1]):
        step = runtime._decode(tokens[:, position:position + 1], position)
        assert np.abs(step[:, 0] - full[:, position]).max() <= BARS["executorch-fp32"]["max_abs"]


def test_a_prompt_that_fills_the_cache(sort_tiny_fp32):
    """A max_length - 2 token prefill and a decode step at the last cached position."""
    checkpoint, out, _ = sort_tiny_fp32
    runtime, eager = load(out), EagerRuntime.from_checkpoint(checkpoint)
    ids = prompt(runtime.config.vocab_size, length=MAX_LENGTH - 2, seed=4)
    delta = compare_logits(runtime.logits(ids), eager.logits(ids))
    assert delta["max_abs"] <= BARS["executorch-fp32"]["max_abs"]
    np.testing.assert_array_equal(runtime.generate(ids, 2), eager.generate(ids, 2))


def test_generation_restarts_cleanly(sort_tiny_fp32):
    """Fresh loads agree, and a longer sequence in between leaves no trace in the cache."""
    _, out, _ = sort_tiny_fp32
    first, second = load(out), load(out)
    short, long = prompt(256, 5, seed=2), prompt(256, 12, seed=3)
    want = first.generate(short, NEW_TOKENS)
    first.generate(long, NEW_TOKENS)
    np.testing.assert_array_equal(first.generate(short, NEW_TOKENS), want)
    np.testing.assert_array_equal(second.generate(short, NEW_TOKENS), want)


# ------------------------------------------------------------------------------ int8
def test_int8_parity_on_trained_model(trained_int8):
    checkpoint, task, out, _ = trained_int8
    int8, eager = load(out), EagerRuntime.from_checkpoint(checkpoint)
    got, want = [], []
    for samples in task.eval_sets.values():  # one length per set
        ids = samples[:, :-1]
        got.append(RowByRow(int8).logits(ids).reshape(-1, int8.config.vocab_size))
        want.append(eager.logits(ids).reshape(-1, int8.config.vocab_size))
    delta = compare_logits(np.concatenate(got)[None], np.concatenate(want)[None])
    bars = BARS["int8"]
    assert delta["top1_agreement"] >= bars["top1_agreement"]
    assert delta["cosine"] >= bars["cosine"]
    accuracy = sorting_accuracy(RowByRow(int8), task)["token_accuracy"]
    reference = sorting_accuracy(eager, task)["token_accuracy"]
    assert reference > 0.5  # the model learned something, so the comparison means something
    assert abs(accuracy - reference) <= bars["token_accuracy_drop"]


def test_int8_is_smaller(sort_tiny_fp32, trained_int8):
    """Same preset, same max length: int8 at most 0.35 of fp32 (issue 5)."""
    _, fp32_path, _ = sort_tiny_fp32
    _, _, int8_path, _ = trained_int8
    assert int8_path.stat().st_size <= 0.35 * fp32_path.stat().st_size


def test_int8_delegates_quantized_linears_and_keeps_router_float(trained_int8):
    _, _, out, record = trained_int8
    config = BiBoConfig.preset("sort-tiny")
    moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    dense_layers = len(config.mlp_only_layers)
    # Every Linear but the router: attention 4, dense SwiGLU 3, the fused experts 3 per MoE
    # layer + the shared expert (conv-as-Linear, up, down), the LM head.
    expected = 4 * config.num_hidden_layers + 3 * dense_layers + moe_layers * (3 + 3) + 1
    assert record["ops"]["quantized_linears"] == expected
    # sort-tiny's router is a Conv1d: it stays a float convolution, one per MoE layer.
    assert record["ops"]["float_linears"] == 0
    assert record["ops"]["delegated_by_op"].get("aten.convolution", 0) \
        + record["ops"]["portable_by_op"].get("aten.convolution", 0) == moe_layers

    # The serialized program itself: what is left outside XNNPACK holds no matmul and no
    # (de)quantization, so every quantized linear runs inside the delegate.
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = next(p for p in deserialize_pte_binary(out.read_bytes()).program.execution_plan
                if p.name == "forward")
    assert plan.delegates and {d.id for d in plan.delegates} == {"XnnpackBackend"}
    portable = {op.name for op in plan.operators}
    matmuls = {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::convolution"}
    assert not portable & matmuls
    assert not [name for name in portable if "quant" in name or "qparams" in name]


# ------------------------------------------------------------------------------ errors
def test_bad_inputs_are_one_line_errors(mlp_router_fp32, tmp_path):
    _, out, _ = mlp_router_fp32
    runtime = load(out)
    bad = {"float ids": np.zeros((1, 3), dtype=np.float32),
           "1-D": np.zeros(3, dtype=np.int64),
           "out of vocabulary": np.full((1, 3), runtime.config.vocab_size),
           "batch 2": np.zeros((2, 3), dtype=np.int64),
           "too long": np.zeros((1, MAX_LENGTH + 1), dtype=np.int64)}
    for name, ids in bad.items():
        with pytest.raises(ValueError) as err:
            runtime.generate(ids, 1)
        assert "\n" not in str(err.value), name
    with pytest.raises(ValueError, match="maximum length"):
        runtime.generate(np.zeros((1, 3), dtype=np.int64), MAX_LENGTH)


def test_missing_truncated_or_foreign_pte_is_a_one_line_error(mlp_router_fp32, tmp_path):
    _, out, _ = mlp_router_fp32
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program" * 100)
    for path in (tmp_path / "missing.pte", truncated, garbage):
        with pytest.raises(ValueError) as err:
            load(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_export_rejects_bad_arguments(mlp_router_fp32, tmp_path):
    checkpoint, _, _ = mlp_router_fp32
    with pytest.raises(ValueError, match="not a checkpoint"):
        et_export.export_executorch(tmp_path, tmp_path / "m.pte")
    with pytest.raises(ValueError, match=".pte"):
        et_export.export_executorch(checkpoint, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        et_export.export_executorch(checkpoint, tmp_path / "m.pte", max_length=10**6)
    assert not list(tmp_path.glob("*.pte"))


def test_manifest_lists_the_program_with_its_verification(mlp_router_fp32):
    from bibo_export.export.manifest import check_manifest

    _, out, _ = mlp_router_fp32
    manifest = check_manifest(out.parent)  # sizes and hashes match the files on disk
    assert [entry["name"] for entry in manifest["files"]] == [out.name]
    assert manifest["programs"][out.name]["verification"]["greedy_match"]
