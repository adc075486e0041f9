"""ONNX export and the ONNX Runtime runtime, against eager PyTorch (docs/parity.md)."""

import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bench.onnx import integer_kernels_alone
from bibo_export.artifacts import ArtifactMetadata
from bibo_export.config import BiBoConfig
from bibo_export.export.onnx import (INTEGER_OPS, OnnxRecipe, experts_to_qmoe, export_onnx,
                                     integer_kernels, qmoe_block_size, tensor_bytes,
                                     weights_read_per_call)
from bibo_export.export.pipeline import ExportSettings
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes import load
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.runtimes.onnx import (METADATA_KEY, PRESENT, OnnxRuntime,
                                       cache_written_in_place, subgraphs)
from bibo_export.verdict import ACCURACY_BARS, FP32_MAX_ABS, compare_logits, compare_tokens
from helpers import (TRAINED_MAX_LENGTH, check_failed_export_keeps_previous, dense_checkpoint,
                     renamed_router_model, run_cli, selection_scores, task_accuracy, tie_gaps,
                     tiny_config, untied_prompt)

pytestmark = pytest.mark.export

MAX_LENGTH = 64
EXPERT_WEIGHT = re.compile(r"layers\.(\d+)\.mlp\.experts\.ffns\.(\d+)\.")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Eager PyTorch on a shared 2-core machine: one thread avoids spin-wait oversubscription
    (50x faster here); the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_random(path, config: BiBoConfig, seed: int):
    torch.manual_seed(seed)
    BiBoForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mlp_router(tmp_path_factory):
    """A random small config with other choices (mlp router, n=6, k=2, K=2, experts of width
    24), exported to fp32 and int8 from one trace: (checkpoint, {precision: folder})."""
    root = tmp_path_factory.mktemp("mlp-router")
    config = tiny_config(router_type="mlp", num_routed_experts=6, num_experts_per_tok=2,
                         kernel_size=2, num_hidden_layers=2, mlp_only_layers=[1])
    checkpoint = save_random(root / "checkpoint", config, seed=1)
    folders = {precision: root / precision for precision in ("fp32", "int8")}
    export_onnx(checkpoint, folders, max_length=MAX_LENGTH)
    return checkpoint, folders


@pytest.fixture(scope="module")
def fp32_exports(trained_export, mlp_router):
    """fp32 exports of the session's trained sort-tiny and of the mlp-router config:
    {name: (checkpoint, export folder)}."""
    checkpoint, _, folder, _ = trained_export("onnx", "fp32")
    return {"sort-tiny": (checkpoint, folder),
            "mlp-router": (mlp_router[0], mlp_router[1]["fp32"])}


@pytest.fixture(scope="module")
def int8_export(trained_export):
    return trained_export("onnx", "int8")


@pytest.fixture(scope="module", params=["int8", "int4"])
def integer_export(request, trained_export):
    """The trained sort-tiny's int8 and int4 exports (one trace wrote both)."""
    return trained_export("onnx", request.param)


@pytest.fixture(scope="module")
def renamed_router_int8(tmp_path_factory):
    """An int8 export of a model object whose routers were renamed (``renamed_router_model``):
    (the model, its weights and module types before the export, the folder, the manifest)."""
    model = renamed_router_model(tiny_config(router_type="mlp", num_hidden_layers=2))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    folder = tmp_path_factory.mktemp("renamed-router") / "int8"
    manifest = export_onnx(model, {"int8": folder}, max_length=MAX_LENGTH)["int8"]
    return model, before, kinds, folder, manifest


# ------------------------------------------------------------------------------ fp32 parity
@pytest.mark.parametrize("name", ["sort-tiny", "mlp-router"])
def test_fp32_logits_and_greedy_generation_match_eager(fp32_exports, name):
    checkpoint, folder = fp32_exports[name]
    onnx_rt, eager = load(folder), load(checkpoint)
    prompts = untied_prompt(eager.model, 24, seed=1, batch=3)
    logits = compare_logits(onnx_rt.logits(prompts), eager.logits(prompts))
    assert logits["max_abs"] <= FP32_MAX_ABS["onnx"], logits
    starts = untied_prompt(eager.model, 8, seed=2, new_tokens=32, batch=3)
    generation = compare_tokens(onnx_rt.generate(starts, 32), eager.generate(starts, 32))
    assert generation["greedy_match"], generation


def test_export_folder_is_complete_and_described(fp32_exports):
    checkpoint, folder = fp32_exports["sort-tiny"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx",
                                                       "model.onnx.data"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    onnx.checker.check_model(folder / "model.onnx")
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ArtifactMetadata.from_json(props[METADATA_KEY], folder)
    assert metadata.config == BiBoForCausalLM.from_pretrained(checkpoint).config
    assert (metadata.max_length, metadata.precision) == (TRAINED_MAX_LENGTH, "fp32")
    names = [i.name for i in model.graph.input]
    assert names[:2] == ["input_ids", "start_pos"] and "layers.1.router_conv" in names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == {"model.onnx", "model.onnx.data"}
    assert manifest["verification"]["passed"] and manifest["verification"]["greedy_match"]
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["torch"]


def test_cache_inputs_are_written_in_their_layout(fp32_exports):
    """Each key and value cache input is read by one ScatterElements, with no transpose of the
    whole cache before it (index_copy's export form had two per layer and step). A Shape node
    may read one for its dims (the cache length), which copies nothing. Each layer's
    ``Attention`` reads the new cache up to the call's last slot only."""
    _, folder = fp32_exports["sort-tiny"]
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    caches = [i.name for i in model.graph.input if i.name.endswith((".key", ".value"))]
    assert caches
    for name in caches:
        readers = [n.op_type for n in model.graph.node if name in n.input]
        assert [op for op in readers if op != "Shape"] == ["ScatterElements"], (name, readers)
    # attention reads them trimmed to the slots the call's queries can see
    produced = {output: node for node in model.graph.node for output in node.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == len(caches) // 2
    for node in attention:
        trims = [produced[name] for name in node.input[1:4]]
        assert [n.op_type for n in trims] == ["Slice"] * 3, node.input
        assert {n.input[2] for n in trims} == {"attention.visible_slots"}
        assert {n.input[0] for n in trims[:2]} <= {PRESENT + name for name in caches}
    # so the runtime writes them in place: every call reads and writes one buffer per cache,
    # and a decode step's keys and values land in it
    runtime = load(folder)
    assert runtime.in_place == set(caches)
    runtime.logits(np.array([[1, 2, 3]]))
    sets = runtime._sequence.sets
    buffers = {i.name: {values[n].data_ptr() for values in sets}
               for n, i in enumerate(runtime.cache_inputs)}
    assert all(len(buffers[name]) == 1 for name in caches)
    assert all(len(ptrs) == 2 for name, ptrs in buffers.items() if name not in caches)
    runtime._decode(np.array([[4]]), 3, None)
    for n, cache_input in enumerate(runtime.cache_inputs):
        if cache_input.name in caches:  # [B, heads, slots, d]: slot 3 written, 4 not yet
            written = sets[0][n].numpy()
            assert np.abs(written[:, :, 3]).max() > 0 and not written[:, :, 4].any()


def cache_graph(extra_reader: str | None) -> onnx.GraphProto:
    """cache → ScatterElements → present.cache, and optionally one more node reading cache."""
    info = onnx.helper.make_tensor_value_info
    nodes = [onnx.helper.make_node("ScatterElements", ["cache", "slots", "new"],
                                   ["present.cache"], axis=2),
             onnx.helper.make_node("Shape", ["cache"], ["dims"])]
    outputs = [info("present.cache", onnx.TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(onnx.helper.make_node(extra_reader, ["cache"], ["old"]))
        outputs.append(info("old", onnx.TensorProto.FLOAT, None))
    inputs = [info(name, onnx.TensorProto.FLOAT, None) for name in ("cache", "new")]
    inputs.append(info("slots", onnx.TensorProto.INT64, None))
    return onnx.helper.make_graph(nodes, "cache", inputs, outputs)


@pytest.mark.parametrize("extra_reader, in_place", [(None, {"cache"}), ("Identity", set()),
                                                    ("Neg", set())])
def test_a_cache_read_after_its_write_is_not_written_in_place(extra_reader, in_place):
    assert cache_written_in_place(cache_graph(extra_reader)) == in_place


def test_prompts_of_different_lengths_in_one_batch(fp32_exports):
    """Lengths 1, 7 and 16 in one left-padded batch, on eager and on ONNX Runtime, as a list and
    as an array with an attention mask: each row generates exactly what its prompt generates
    alone, and its logits match the prompt's own to the ONNX fp32 bar."""
    checkpoint, folder = fp32_exports["sort-tiny"]
    onnx_rt, eager = load(folder), load(checkpoint)
    prompts = [untied_prompt(eager.model, n, seed=3 + n, new_tokens=8)[0] for n in (1, 7, 16)]
    alone_tokens = [eager.generate(p[None], 8)[0] for p in prompts]
    alone_logits = [eager.logits(p[None])[0] for p in prompts]
    padded = np.stack([np.concatenate([np.full(16 - len(p), 7), p]) for p in prompts])
    mask = (np.arange(16)[None] >= np.array([15, 9, 0])[:, None]).astype(np.int64)
    for runtime in (eager, onnx_rt):
        tokens, logits = runtime.generate(prompts, 8), runtime.logits(prompts)
        masked_tokens = runtime.generate(padded, 8, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            np.testing.assert_array_equal(tokens[row], alone_tokens[row])
            np.testing.assert_array_equal(masked_tokens[row, 16 - len(prompt):],
                                          alone_tokens[row])
            assert np.abs(logits[row] - alone_logits[row]).max() <= FP32_MAX_ABS["onnx"]
    with pytest.raises(ValueError, match="left padding"):
        eager.logits(padded, attention_mask=mask[:, ::-1])


# ------------------------------------------------------------------------------ decode cost
def test_decode_runs_only_the_selected_experts(fp32_exports):
    """ORT's profiler: the expert weights read in each decode step are exactly those of the
    MLP experts eager routing selected for that token."""
    checkpoint, folder = fp32_exports["mlp-router"]
    model = BiBoForCausalLM.from_pretrained(checkpoint).inference_copy()
    prompt = np.array([[5, 9, 1, 33]], dtype=np.int64)
    tokens = torch.from_numpy(EagerRuntime(model).generate(prompt, 6))
    moe_layers = [i for i, layer in enumerate(model.layers) if layer.is_moe]
    num_mlp = model.config.num_mlp_experts
    cache = model.new_cache(1, MAX_LENGTH)
    expected = []
    with torch.no_grad():
        for position in range(tokens.shape[1] - 1):
            out = model(tokens[:, position:position + 1], cache=cache, start_pos=position)
            cache = out.cache
            if position >= prompt.shape[1] - 1:  # the decode steps (the prefill's last token on)
                expected.append({(layer, e) for layer, stats in zip(moe_layers, out.routing)
                                 for e in range(num_mlp) if stats.expert_counts[e] > 0})
    calls = weights_read_per_call(folder, prompt, 6)
    ran = [{(int(m[1]), int(m[2])) for m in map(EXPERT_WEIGHT.search, call) if m}
           for call in calls[1:]]
    assert ran == expected[1:]
    all_experts = {(layer, e) for layer in moe_layers for e in range(num_mlp)}
    assert all(step < all_experts for step in ran)


# int8 moves the selection scores by a few hundredths on the trained sort-tiny: steps whose
# k-th and (k+1)-th scores are this far apart route the same in eager and in the int8 graph.
INT8_SAFE_ROUTING_GAP = 0.05


def test_int8_decode_reads_the_qmoe_experts_eager_routing_chose(int8_export):
    """``weights_read_per_call``'s QMoE branch (what `make bench-onnx` reports as bytes per
    token): in each decode step each QMoE node reads its weights' share of the MLP experts that
    eager routing chose for that token, on the int8 program's own tokens, at steps clear of
    any routing tie."""
    checkpoint, _, folder, _ = int8_export
    model = BiBoForCausalLM.from_pretrained(checkpoint).inference_copy()
    config, new_tokens = model.config, 8
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    initializers = {init.name: init for init in graph.initializer}
    qmoe_nodes = [node for node in graph.node if node.op_type == "QMoE"]  # in layer order
    assert len(qmoe_nodes) == len(model.moe_layers)
    # weight name → (its MoE layer's position, its bytes)
    qmoe_weights = {name: (layer, tensor_bytes(initializers[name]))
                    for layer, node in enumerate(qmoe_nodes)
                    for name in node.input if name in initializers}
    int8 = load(folder)
    for seed in range(20):
        prompt = np.random.default_rng(seed).integers(0, config.vocab_size, (1, 6))
        tokens = int8.generate(prompt, new_tokens)
        decode_steps = range(prompt.shape[1], tokens.shape[1] - 1)  # a token fed back in
        scores = [layer[decode_steps] for layer in selection_scores(model, tokens)]
        if min(tie_gaps(s, config.num_experts_per_tok).min() for s in scores) \
                >= INT8_SAFE_ROUTING_GAP:
            break
    else:
        pytest.fail("no prompt of 20 decodes clear of routing ties")
    calls = weights_read_per_call(folder, prompt, new_tokens)[1:]
    assert len(calls) == len(decode_steps)
    mlp_experts = config.num_mlp_experts
    for step, call in enumerate(calls):
        chosen = [int((layer[step].topk(config.num_experts_per_tok).indices < mlp_experts).sum())
                  for layer in scores]
        read = {name: size for name, size in call.items() if name in qmoe_weights}
        expected = {name: size * chosen[layer] // mlp_experts
                    for name, (layer, size) in qmoe_weights.items()}
        assert read == expected, (step, chosen)


def test_integer_kernels_alone_compute_what_they_compute_in_the_program(int8_export, tmp_path):
    """`make bench-onnx`'s ceiling (``integer_kernels_alone``): fed the values their inputs held
    in a decode step of the whole int8 program, the integer kernels alone return what they
    returned there: the same kernels, weights and routing."""
    _, _, folder, _ = int8_export
    program = onnx.load(folder / "model.onnx")
    alone = integer_kernels_alone(program)
    assert len(alone.graph.node) == sum(n.op_type in INTEGER_OPS for n in program.graph.node)
    inputs = [value.name for value in alone.graph.input]
    outputs = [value.name for value in alone.graph.output]
    # The whole program, its kernels' inputs and outputs also graph outputs, after the cache's
    # (the last kernel's output, the logits, already is one).
    extra = [name for name in inputs + outputs if name != "logits"]
    program.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    onnx.save_model(program, tmp_path / "model.onnx")
    whole = OnnxRuntime.from_path(tmp_path, check=False)
    whole._prefill(np.array([[1, 2, 3, 4]]), None)
    logits = whole._decode(np.array([[5]]), 4, None)
    seen = dict(zip(extra, (value.numpy() for value in whole.extra_outputs)), logits=logits)
    session = ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {name: seen[name] for name in inputs})
    assert all(np.prod(seen[name].shape[:-1]) == 1 for name in inputs)  # one token
    for name, value in zip(outputs, got):
        np.testing.assert_allclose(value, seen[name], rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------ int8, int4
def test_integer_exports_meet_their_bars_on_trained_eager(integer_export):
    checkpoint, task, folder, manifest = integer_export
    bars = ACCURACY_BARS[manifest["precision"]]
    exported, eager = load(folder), load(checkpoint)
    ids = np.concatenate([ids for ids, _ in task.held_out()])
    metrics = compare_logits(exported.logits(ids), eager.logits(ids))
    assert metrics["top1_agreement"] >= bars["top1_agreement"], metrics
    assert metrics["cosine"] >= bars["cosine"], metrics
    got, want = task_accuracy(exported, task), task_accuracy(eager, task)
    assert want["token_accuracy"] > 0.5, want  # the model learned the task: a meaningful test
    assert got["token_accuracy"] >= want["token_accuracy"] - bars["token_accuracy_drop"]


def test_integer_graphs_run_integer_expert_kernels_and_a_float_router(integer_export):
    """int8 and int4: QMoE experts and MatMulNBits linears of the precision's bits."""
    _, _, folder, manifest = integer_export
    bits = {"int8": 8, "int4": 4}[manifest["precision"]]
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    graphs = list(subgraphs(model.graph))
    config = ArtifactMetadata.from_json(
        {p.key: p.value for p in model.metadata_props}[METADATA_KEY], folder).config
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    # sort-tiny's experts (h 256, m 256) fit QMoE's blocks: one node per MoE layer, no If left.
    ops = [n.op_type for g in graphs for n in g.node]
    assert ops.count("QMoE") == moe_layers and "If" not in ops
    for node in (n for g in graphs for n in g.node if n.op_type in ("QMoE", "MatMulNBits")):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["expert_weight_bits" if node.op_type == "QMoE" else "bits"] == bits
    int8_inputs = {name for g in graphs for n in g.node if n.op_type == "MatMulNBits"
                   for name in n.input}
    for part in ("self_attn.q_proj", "self_attn.o_proj", "lm_head", "shared_expert"):
        assert any(part in name for name in int8_inputs), part
    # The embedding lookup reads a table of the precision's bits.
    lookups = [n for n in model.graph.node
               if any("embed_tokens" in name and name.endswith("_quantized") for name in n.input)]
    assert [n.op_type for n in lookups] == \
        [{"int8": "Gather", "int4": "GatherBlockQuantized"}[manifest["precision"]]]
    router = [n for n in model.graph.node if any(".router.weight" in i for i in n.input)]
    assert router and all(n.op_type == "Conv" for n in router)  # the float conv router
    assert not any("router" in name for name in int8_inputs)
    # What ORT runs after its own graph optimizations, If branches included.
    kernels = integer_kernels(folder / "model.onnx")
    assert kernels.get("QMoE") == moe_layers and kernels.get("MatMulNBits", 0) >= moe_layers
    assert set(manifest["quantization"]["quantized_weights"]) >= {"experts", "attention",
                                                                 "lm_head", "embedding"}


def test_int8_qmoe_weights_are_the_checkpoints_experts(int8_export):
    """Each QMoE node's 8-bit weights, dequantized here, are its layer's experts from the
    checkpoint to within one quantization step: gate and up rows interleaved in fc1, down in
    fc2, experts in order. (ORT's symmetric scheme maps a block's largest magnitude to -128, so
    an opposite value of that magnitude clips at 127: one step off; the rest round, ½ step.)"""
    checkpoint, _, folder, _ = int8_export
    model = onnx.load(folder / "model.onnx")
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    eager = BiBoForCausalLM.from_pretrained(checkpoint)
    nodes = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(nodes) == len(eager.moe_layers)
    for node, moe in zip(nodes, eager.moe_layers):
        layer = re.search(r"layers\.(\d+)\.", node.name)[1]
        assert moe is eager.layers[int(layer)].mlp
        check_expert_weights(node, arrays, moe.experts)


def dequantize(weights: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[E, N, K] uint8 (zero point 128) with signed scales [E, N, K / block] → (float weights,
    each weight's quantization step)."""
    scale = np.repeat(scales, weights.shape[2] // scales.shape[2], axis=2)
    return (weights.astype(np.float32) - 128) * scale, np.abs(scale)


def check_expert_weights(node: onnx.NodeProto, arrays: dict[str, np.ndarray], experts) -> None:
    """A QMoE node's weights, dequantized, are ``experts``' to within one step: gate and up
    rows interleaved in fc1, down in fc2, experts in order."""
    fc1, fc1_step = dequantize(arrays[node.input[2]], arrays[node.input[3]])
    fc2, fc2_step = dequantize(arrays[node.input[5]], arrays[node.input[6]])
    for got, step, want in ((fc1[:, 0::2], fc1_step[:, 0::2], experts.gate_proj),
                            (fc1[:, 1::2], fc1_step[:, 1::2], experts.up_proj),
                            (fc2, fc2_step, experts.down_proj)):
        assert got.shape == want.shape
        assert (np.abs(got - want.detach().numpy()) <= 1.0001 * step).all()


def test_int8_experts_qmoe_cannot_block_keep_their_if_nodes(mlp_router):
    """Experts of width 24 fit no QMoE block (a power of two ≥ 16): they stay one If per expert
    with MatMulNBits inside, and the export verifies."""
    checkpoint, folders = mlp_router
    manifest = json.loads((folders["int8"] / "manifest.json").read_text())
    assert manifest["quantization"]["qmoe_experts"] == []
    assert manifest["verification"]["passed"]
    model = onnx.load(folders["int8"] / "model.onnx", load_external_data=False)
    config = BiBoForCausalLM.from_pretrained(checkpoint).config
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert len(ifs) == moe_layers * config.num_mlp_experts
    branch_ops = [n.op_type for i in ifs for a in i.attribute for g in subgraphs(a.g)
                  for n in g.node]
    assert branch_ops.count("MatMulNBits") == 3 * len(ifs)


@pytest.mark.parametrize("bits, bound", [(8, 2e-3), (4, 2e-2)])
def test_qmoe_rewrite_alone_changes_logits_by_the_experts_rounding_only(bits, bound):
    """The fp32 graph with only its experts rewritten to QMoE, against that fp32 graph: the one
    difference left is the experts' 8-bit rounding (measured 4e-4 of the logits' range here;
    gate and up rows swapped gave 5e-3), or their 4-bit rounding. Two layers, one of them MoE:
    the same checks in two thirds of the time of three layers."""
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config(hidden_size=64, moe_intermediate_size=32,
                                        num_hidden_layers=2)).eval()
    recipe = OnnxRecipe(ExportSettings(max_length=32, batch_size=None))
    fp32 = recipe.export(recipe.transform(model))
    onnx.load_external_data_for_model(fp32.model, fp32.weights_dir.name)
    fused = recipe.fork(fp32)
    assert len(experts_to_qmoe(fused, bits, 32)) == len(model.moe_layers)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
    want, got = (prompt_logits(graph.model, ids) for graph in (fp32, fused))
    assert np.abs(got - want).max() <= bound * np.abs(want).max()


def prompt_logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    """Logits of an in-memory exported graph for prompts ``ids``, from an empty cache."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "start_pos": np.array(0), "pad": np.zeros(len(ids), np.int64)}
    feeds.update((cache.name, np.zeros([len(ids), *cache.shape[1:]], np.float32))
                 for cache in session.get_inputs()[3:])
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("width, hidden, block", [(512, 512, 128), (256, 96, 32), (24, 32, None),
                                                  (1536, 1024, 128), (48, 64, 16)])
def test_qmoe_block_is_the_largest_power_of_two_dividing_both_dims(width, hidden, block):
    assert qmoe_block_size(width, hidden, 128) == block


def test_int8_holds_no_float_embedding_table(int8_export):
    _, _, folder, _ = int8_export
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    config = ArtifactMetadata.from_json(
        {p.key: p.value for p in model.metadata_props}[METADATA_KEY], folder).config
    shapes = ([config.vocab_size, config.hidden_size], [config.hidden_size, config.vocab_size])
    tables = [i for g in subgraphs(model.graph) for i in g.initializer if list(i.dims) in shapes]
    assert tables and all(t.data_type == onnx.TensorProto.INT8 for t in tables), \
        [(t.name, t.data_type) for t in tables]
    lookups = [n for n in model.graph.node if n.op_type == "Gather"
               and any(n.input[0] == t.name for t in tables)]
    assert len(lookups) == 1, [n.name for n in lookups]  # the input embedding, read as int8


def test_integer_files_are_at_most_035_and_020_of_fp32(integer_export, fp32_exports):
    """int8 files at most 0.35 of fp32's, int4 at most 0.20 (its embedding table stays int8)."""
    _, _, folder, manifest = integer_export
    fp32_folder = fp32_exports["sort-tiny"][1]  # the same model in fp32
    size = lambda f: sum(p.stat().st_size for p in f.iterdir() if p.name.startswith("model"))
    bound = {"int8": 0.35, "int4": 0.20}[manifest["precision"]]
    assert size(folder) <= bound * size(fp32_folder), (size(folder), size(fp32_folder))


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("ids, max_new, message", [
    (np.array([[1, 256]]), 0, "outside the vocabulary"),
    (np.array([[-1, 2]]), 0, "outside the vocabulary"),
    (np.zeros((1, 0), np.int64), 0, "empty"),
    (np.ones((1, 40), np.int64), 10, f"exceeds the maximum length {TRAINED_MAX_LENGTH}"),
    (np.array([1, 2, 3]), 0, "shape"),
    (np.array([[1.0, 2.0]]), 0, "integers"),
    (5, 0, "numpy array"),
])
def test_bad_inputs_are_one_line_value_errors(fp32_exports, ids, max_new, message):
    runtime = load(fp32_exports["sort-tiny"][1])
    with pytest.raises(ValueError, match=message) as err:
        runtime.generate(ids, max_new) if max_new else runtime.logits(ids)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("drop-data", "model.onnx.data is missing"),
    ("drop-manifest", "no manifest.json"), ("truncate-unchecked", "cannot load"),
])
def test_damaged_export_is_reported(fp32_exports, tmp_path, damage, message):
    folder = shutil.copytree(fp32_exports["mlp-router"][1], tmp_path / "export")
    model_file = folder / "model.onnx"
    if damage.startswith("truncate"):
        model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    elif damage == "drop-data":
        (folder / "model.onnx.data").unlink()
    else:
        (folder / "manifest.json").unlink()
    if damage == "truncate-unchecked":
        from bibo_export.runtimes.onnx import OnnxRuntime
        call = lambda: OnnxRuntime.from_path(folder, check=False)
    else:
        call = lambda: load(folder)
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_exporting_a_model_object_leaves_it_untouched(renamed_router_int8):
    """The pipeline transforms its own copy in place: the caller's model keeps its modules
    and weights, and the export computes what it computes."""
    model, before, kinds, _, manifest = renamed_router_int8
    assert [type(module) for module in model.modules()] == kinds
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert manifest["verification"]["passed"]


def test_export_rejects_bad_arguments(tmp_path, fp32_exports):
    with pytest.raises(ValueError, match="not found"):
        export_onnx(tmp_path / "nowhere", {"fp32": tmp_path / "out"})
    with pytest.raises(ValueError, match="max_length"):
        export_onnx(fp32_exports["mlp-router"][0], {"fp32": tmp_path / "out"}, max_length=10_000)
    with pytest.raises(ValueError, match="must be a folder"):
        export_onnx(fp32_exports["mlp-router"][0], {"fp32": tmp_path / "model.onnx"})
    assert not list(tmp_path.iterdir())


def test_failed_verification_publishes_nothing(fp32_exports, tmp_path, tmp_path_factory):
    """An export whose check against eager fails (here: against a perturbed reference) raises
    and leaves the previous export byte for byte as it was. The smallest model exports over the
    mlp-router export: the same stages in less time."""
    folder = fp32_exports["mlp-router"][1]
    checkpoint = dense_checkpoint(tmp_path_factory.mktemp("dense"))
    check_failed_export_keeps_previous(
        lambda outs, reference: export_onnx(checkpoint, outs, max_length=MAX_LENGTH,
                                            reference=reference),
        checkpoint, folder, tmp_path)


def test_int8_keeps_the_router_float_by_identity(renamed_router_int8):
    """Renamed and reached through a property, the router is still found (by its type) and
    kept float: the int8 graph reads its weight in a float MatMul."""
    _, _, _, folder, manifest = renamed_router_int8
    assert manifest["quantization"]["float_router_nodes"]
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    gating = [n for n in graph.node if any(".gating." in name for name in n.input)]
    assert gating and all(n.op_type == "MatMul" for n in gating), [n.op_type for n in gating]
    assert not [i.name for i in graph.initializer if ".gating." in i.name and "quantized" in i.name]


def test_cli_generate_on_an_onnx_folder(fp32_exports, tmp_path):
    checkpoint, folder = fp32_exports["mlp-router"]

    def generate(model):
        return run_cli("generate", "--model", model, "--prompt-ids", "3,1,2,5",
                       "--max-new-tokens", 6)

    ok, reference = generate(folder), generate(checkpoint)
    assert ok.returncode == reference.returncode == 0, ok.stderr
    assert ok.stdout.split("->")[1] == reference.stdout.split("->")[1]  # same greedy tokens
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (damaged / "model.onnx").write_bytes((damaged / "model.onnx").read_bytes()[:1000])
    bad = generate(damaged)
    assert bad.returncode == 2 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
