"""ExecuTorch export, fp32: parity against eager (docs/parity.md), cache resets, errors.

Each program is exported once (fixtures); exports are slow, tests are not. The trained
sort-tiny's program is the session's (``trained_export``), shared with the pipeline test; its
int8 and int4 programs are tested in test_executorch_integer.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bibo_export.artifacts import check_manifest
from bibo_export.config import BiBoConfig
from bibo_export.export import executorch as et_export
from bibo_export.export.pipeline import ExportSettings
from bibo_export.export.transforms import DynamicInt8Linear
from bibo_export.kernels.library import KernelCounters, read_counters
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes import load
from bibo_export.runtimes.base import RowByRow
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.verdict import FP32_MAX_ABS, compare_logits
from helpers import (TRAINED_MAX_LENGTH, check_failed_export_keeps_previous, dense_checkpoint,
                     renamed_router_model, tiny_config, untied_prompt)

pytestmark = pytest.mark.export

MAX_LENGTH = TRAINED_MAX_LENGTH  # the trained program's, and the random one's
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def sort_tiny_fp32(trained_export):
    """The default program (the selected experts through BiBo's kernel) of the session's trained
    sort-tiny: (checkpoint, folder, manifest)."""
    checkpoint, _, folder, manifest = trained_export("executorch", "fp32")
    return checkpoint, folder, manifest


@pytest.fixture(scope="module")
def sort_tiny_fused_fp32(trained_export):
    """The trained sort-tiny's program without the kernel library: all experts fused into
    XNNPACK linears, attention masked inside XNNPACK."""
    checkpoint, _, folder, manifest = trained_export("executorch", "fused-fp32")
    return checkpoint, folder, manifest


@pytest.fixture(scope="module")
def mlp_router_fp32(tmp_path_factory):
    """A random second config (mlp router, other n and k, a MoE layer before the dense one, one
    KV head, where ExecuTorch's own cache operator failed) as a default program: experts and
    attention through BiBo's kernels."""
    config = tiny_config(router_type="mlp", num_routed_experts=6, num_experts_per_tok=2,
                         num_hidden_layers=2, mlp_only_layers=[1], num_key_value_heads=1)
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("mlp-router") / "checkpoint"
    BiBoForCausalLM(config).save_pretrained(checkpoint)
    out = checkpoint.parent / "fp32"
    manifest = et_export.export_executorch(checkpoint, {"fp32": out}, max_length=MAX_LENGTH)
    return checkpoint, out, manifest["fp32"]


def prompt(vocab_size: int, length: int, seed: int) -> np.ndarray:
    """Seeded random token ids [1, length], for what is not compared with eager (``untied_prompt``
    is)."""
    return np.random.default_rng(seed).integers(0, vocab_size, (1, length))


# ------------------------------------------------------------------------------ fp32 parity
@pytest.mark.parametrize("exported", ["sort_tiny_fp32", "sort_tiny_fused_fp32",
                                      "mlp_router_fp32"])
def test_fp32_logits_and_greedy_tokens_match_eager(exported, request):
    checkpoint, out, _ = request.getfixturevalue(exported)
    runtime, eager = load(out), EagerRuntime.from_path(checkpoint)
    ids = untied_prompt(eager.model, 12, seed=1, new_tokens=NEW_TOKENS)
    delta = compare_logits(runtime.logits(ids), eager.logits(ids))
    assert delta["max_abs"] <= FP32_MAX_ABS["executorch"]
    np.testing.assert_array_equal(runtime.generate(ids, NEW_TOKENS),
                                  eager.generate(ids, NEW_TOKENS))


def test_experts_run_as_exported(sort_tiny_fp32, sort_tiny_fused_fp32, mlp_router_fp32):
    """Default programs call the kernel once per MoE layer; the fused one never does."""
    for (checkpoint, _, manifest), mode in ((sort_tiny_fp32, "selected"),
                                            (sort_tiny_fused_fp32, "fused"),
                                            (mlp_router_fp32, "selected")):
        config = BiBoConfig.from_file(checkpoint / "config.json")
        moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
        calls = manifest["ops"]["portable_by_op"].get("bibo.moe_experts", 0)
        assert manifest["experts"] == mode
        assert calls == (moe_layers if mode == "selected" else 0)


def test_norms_stay_inside_xnnpack_and_attention_runs_the_cache_kernel(sort_tiny_fp32,
                                                                        sort_tiny_fused_fp32):
    """What stays outside XNNPACK is routing, cache writes and, in programs with selected
    experts, attention as BiBo's ``bibo::cache_attention`` over a cache that
    ``bibo::update_cache`` writes in place, not the layers' arithmetic: no
    norm (the routers' logit normalisation is the only mean left), no copy of the KV cache to
    repeat its heads, no slice of a dynamic-length tensor. The fused program keeps the masked
    attention inside XNNPACK: it needs no custom kernel."""
    checkpoint, _, manifest = sort_tiny_fp32
    config = BiBoConfig.from_file(checkpoint / "config.json")
    moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    portable = manifest["ops"]["portable_by_op"]
    assert portable.get("bibo.cache_attention", 0) == config.num_hidden_layers
    # Keys and values are written in place: no out-of-place index_put copies the cache.
    assert portable.get("bibo.update_cache", 0) == 2 * config.num_hidden_layers
    assert not any(op.startswith("llama.") for op in portable)  # ExecuTorch's LLM ops: none
    assert "aten.index_put" not in portable
    fused = sort_tiny_fused_fp32[2]["ops"]
    assert not any(op.startswith("bibo.") for op in fused["portable_by_op"])
    assert fused["delegated_by_op"]["aten.bmm"] == 2 * config.num_hidden_layers  # QKᵀ and PV
    assert portable.get("aten.mean.dim", 0) == moe_layers
    assert "aten.expand_copy" not in portable
    # The windows and states of each MoE layer's two causal convolutions slice (5 slices);
    # RoPE's halves did too (4 per layer) until they became a product.
    assert portable.get("aten.slice_copy.Tensor", 0) <= 5 * moe_layers


def test_a_decode_step_reads_only_the_chosen_experts(sort_tiny_fp32):
    """Measured inside the kernel: one decode step reads, per MoE layer, exactly the MLP
    experts that eager routing chose for that token, and its logits meet the fp32 bar."""
    checkpoint, out, _ = sort_tiny_fp32
    program, eager = load(out), BiBoForCausalLM.from_pretrained(checkpoint).inference_copy()
    ids = untied_prompt(eager, 13, seed=1)
    cache = eager.new_cache(1, MAX_LENGTH)
    with torch.no_grad():
        cache = eager(torch.from_numpy(ids[:, :-1]), cache=cache, start_pos=0).cache
        step = eager(torch.from_numpy(ids[:, -1:]), cache=cache, start_pos=12)
    experts = eager.moe_layers[0].experts
    per_expert = sum(w[0].numel() * 4 for w in (experts.gate_proj, experts.up_proj,
                                                   experts.down_proj))
    chosen = sum(int((stats.expert_counts[:eager.config.num_mlp_experts] > 0).sum())
                 for stats in step.routing)
    program.logits(ids[:, :-1])  # prefill, then one decode step measured alone
    read_counters(reset=True)
    logits = program._decode(ids[:, -1:], 12, None)
    assert read_counters() == KernelCounters(chosen * per_expert, chosen)
    assert 0 < chosen < len(step.routing) * eager.config.num_mlp_experts
    assert np.abs(logits - step.logits.numpy()).max() <= FP32_MAX_ABS["executorch"]


def test_decode_steps_match_full_forward(sort_tiny_fp32):
    """Every cached decode step's logits equal eager's full forward over the whole sequence."""
    checkpoint, out, _ = sort_tiny_fp32
    runtime = load(out)
    model = BiBoForCausalLM.from_pretrained(checkpoint).inference_copy()
    ids = untied_prompt(model, 8, seed=1, new_tokens=8)
    tokens = runtime.generate(ids, 8)
    with torch.no_grad():
        full = model(torch.from_numpy(tokens)).logits.numpy()
    runtime.logits(tokens[:, :8])
    for position in range(8, tokens.shape[1]):
        step = runtime._decode(tokens[:, position:position + 1], position, None)
        assert np.abs(step[:, 0] - full[:, position]).max() <= FP32_MAX_ABS["executorch"]


def test_a_prompt_that_fills_the_cache(sort_tiny_fp32):
    """A max_length - 2 token prefill and a decode step at the last cached position."""
    checkpoint, out, _ = sort_tiny_fp32
    runtime, eager = load(out), EagerRuntime.from_path(checkpoint)
    ids = untied_prompt(eager.model, MAX_LENGTH - 2, seed=4, new_tokens=2)
    delta = compare_logits(runtime.logits(ids), eager.logits(ids))
    assert delta["max_abs"] <= FP32_MAX_ABS["executorch"]
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


def test_prompts_of_different_lengths_run_row_by_row(sort_tiny_fp32):
    """A program of batch 1 takes a list of prompts of different lengths through RowByRow:
    each row generates what eager generates for that prompt alone."""
    checkpoint, out, _ = sort_tiny_fp32
    runtime, eager = RowByRow(load(out)), EagerRuntime.from_path(checkpoint)
    prompts = [untied_prompt(eager.model, n, seed=n, new_tokens=8)[0] for n in (1, 7, 16)]
    for got, want in zip(runtime.generate(prompts, 8), eager.generate(prompts, 8)):
        np.testing.assert_array_equal(got, want)


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
    program = (out / "model.pte").read_bytes()
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(program[: len(program) // 2])
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program" * 100)
    for path in (tmp_path / "missing.pte", truncated, garbage):
        with pytest.raises(ValueError) as err:
            load(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_export_rejects_bad_arguments(mlp_router_fp32, tmp_path):
    checkpoint, _, _ = mlp_router_fp32
    with pytest.raises(ValueError, match="not a checkpoint"):
        et_export.export_executorch(tmp_path, {"fp32": tmp_path / "m"})
    with pytest.raises(ValueError, match="must be a folder"):
        et_export.export_executorch(checkpoint, {"fp32": tmp_path / "m.pte"})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        et_export.export_executorch(checkpoint, {"fp32": tmp_path / "m"}, max_length=10**6)
    assert not list(tmp_path.iterdir())


def test_manifest_lists_the_program_with_its_verification(mlp_router_fp32):
    _, out, _ = mlp_router_fp32
    manifest = check_manifest(out)  # sizes and hashes match the files on disk
    assert [entry["name"] for entry in manifest["files"]] == ["model.pte"]
    assert manifest["verification"]["greedy_match"] and manifest["verification"]["passed"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pte"]


def test_failed_verification_publishes_nothing(mlp_router_fp32, tmp_path, tmp_path_factory):
    """A program whose check against eager fails (a perturbed reference) is not published:
    the export raises, and the previous folder stays byte for byte as it was. The smallest model
    exports over the mlp-router program: the same stages in less time."""
    out = mlp_router_fp32[1]
    checkpoint = dense_checkpoint(tmp_path_factory.mktemp("dense"))
    check_failed_export_keeps_previous(
        lambda outs, reference: et_export.export_executorch(
            checkpoint, outs, max_length=MAX_LENGTH, reference=reference),
        checkpoint, out, tmp_path)


def test_int8_keeps_the_router_float_by_identity():
    """Renamed and reached through a property, the routers are still found (by type) and
    left out of 8da8w; every other Linear is quantized."""
    model = renamed_router_model(tiny_config(router_type="mlp", num_hidden_layers=2))
    recipe = et_export.ExecuTorchRecipe(ExportSettings(max_length=16, batch_size=1))
    build = recipe.transform(model)
    linears = {name for name, module in build.decoder.named_modules()
               if isinstance(module, torch.nn.Linear)}
    routers = {name for name in linears if name.endswith(".gating")}
    build = et_export.quantize_int8(build)
    assert routers and build.quantized == linears - routers
    modules = dict(build.decoder.named_modules())
    for name in linears:
        assert isinstance(modules[name], DynamicInt8Linear) == (name not in routers), name
        assert modules[name].weight.dtype == (torch.float32 if name in routers else torch.int8)


@pytest.mark.parametrize("experts", ["selected", "fused"])
def test_int8_module_form_stays_within_int8_error_of_eager(experts):
    """The int8 decoder, run eagerly before any export (both expert forms), computes the
    model's logits to within int8 error: its modules fit the forms they replace."""
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
    recipe = et_export.ExecuTorchRecipe(ExportSettings(max_length=16, batch_size=1),
                                        experts=experts)
    build = et_export.quantize_int8(recipe.transform(copy.deepcopy(model)))
    with torch.no_grad():
        got = build.decoder(ids, torch.tensor([0]))
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cosine > 0.999, cosine
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
