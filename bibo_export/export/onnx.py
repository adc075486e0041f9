"""ONNX export recipe: transform → export → quantize (int8) → save, run by ``pipeline``.

One graph serves prefill and decode: ``(input_ids [B, T], start_pos [], pad [B], *cache) →
(logits, *new cache)``, the KV cache and conv states explicit inputs/outputs of static length
``max_length``. Experts run under ``torch.cond`` (ONNX ``If``), so a decode step runs only the
experts some token selected. fp32 and int8 come from one trace. Opset 23, for its ``Attention``
operator (``SdpaGroupedAttention``) and because ORT fuses RoPE into ``RotaryEmbedding`` there.
Each ``Attention`` reads the cache only up to the call's last slot (``trim_attention``).

int8 is ORT's ``MatMulNBits`` (8-bit weights in blocks of ``BLOCK_SIZE`` along the input, one
fp32 scale per block; ``accuracy_level`` 4: int8 compute, each row of the activations quantized
on its own) on every constant-weight MatMul except the routers', plus int8 embedding tables with
per-row scales (``quantize_embedding_tables``). Per-row activation scales are why: ORT's dynamic
quantization (``DynamicQuantizeMatMul``) gives one activation scale to a whole call, and on a
text model the SwiGLU outputs entering the down projections carry outliers that cost every other
token its precision (``text-tiny`` on 2,048 held-out positions, 2026-11-26: top-1 agreement
97.3 % with one scale per call, 99.0 % per row; ExecuTorch's 8da8w, per token, 99.6 %). int4
is the same with 4-bit blocks of the group size and 4-bit embedding tables
(``GatherBlockQuantized``). The routers stay float: a routing flip is a discrete, unbounded
error (docs/export.md). The router nodes are the ones the exporter recorded as computed inside a
``Router`` module (found by type, not by name).

The experts of each MoE layer become one ``com.microsoft.QMoE`` node (``experts_to_qmoe``):
8-bit blocks of ORT's own quantization, int8 compute, the routing as inputs. Its CPU kernel
runs only the experts a token gave a nonzero weight, as the ``If`` nodes did, in one node where
the ``If`` chain was about ten per expert (`bench` int8, 2026-11-26: 1,275 → 735 nodes per
decode step, prefill 0.6× the time). Experts whose dims fit no QMoE block keep their ``If``
nodes: ``nn.Linear`` on the MoE's flat 2-D tokens exports as ``Gemm``, which the quantizer
skips, so those Gemms are rewritten to ``MatMul`` first; the quantizer enters the ``If``
subgraphs itself.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                              DefaultWeightOnlyQuantizer,
                                                              MatMulNBitsQuantizer)
from torch import nn

from ..artifacts import (INT4_GROUP_SIZE, INTEGER_PRECISIONS, ONNX_DATA_FILE, ONNX_FILE,
                         ArtifactMetadata, check_group_size)
from ..kernels.moe_experts import pack_int4, quantize_groups, quantize_rows
from ..model import BiBoForCausalLM
from ..model.attention import Attention, GroupedAttention
from ..model.layers import CacheWrite, SwiGLU
from ..model.moe import MLPExperts, Router, SharedConvExpert
from ..runtimes.onnx import METADATA_KEY, PRESENT, OnnxRuntime, subgraphs
from .decoders import FlatCacheDecoder, cache_names, flatten_cache
from .pipeline import ExportSettings, Recipe, Stage, run_export
from .transforms import (ScatterCacheWrite, SdpaGroupedAttention,
                         SkipUnselectedExperts, UnfoldedSharedExpert, export_form, router_names)

OPSET = 23
# The integer kernels ORT runs for the quantized MatMuls (after its own fusions) and experts.
INTEGER_OPS = ("MatMulNBits", "QMoE")
LOOKUPS = ("Gather", "GatherBlockQuantized")  # embedding lookups: each reads only its rows
# Weights per scale along each weight column: at 128 a weight costs 1.03 bytes; 32 measured no
# more accurate on text-tiny and slower (2026-11-26).
BLOCK_SIZE = 128
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's record of each node's modules


@dataclass
class OnnxGraph:
    """The recipe's state after export: the graph, and what quantization did to it."""

    model: onnx.ModelProto
    router_scopes: set[str]  # qualified names of the Router modules
    module_groups: dict[str, str]  # qualified module name → experts, attention, ...
    top_k: int  # experts each token selects (routed, parameter-free ones included)
    quantization: dict[str, Any] | None = field(default=None)
    # Where the graph's weights are while they are external (model.onnx.data): the export
    # streams them to disk, so no second in-memory copy (3 GB at 750M parameters) is built.
    # None once they are in the graph itself (after quantization).
    weights_dir: tempfile.TemporaryDirectory | None = None


class OnnxRecipe(Recipe):
    format = "onnx"
    versions_of = ("onnx", "onnxscript", "onnxruntime")

    def shared_stages(self) -> list[Stage]:
        return [("transform", self.transform), ("export", self.export),
                ("trim attention", trim_attention)]

    def __init__(self, settings: ExportSettings, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__(settings)
        check_group_size(group_size)
        self.group_size = group_size

    def output_stages(self, metadata: ArtifactMetadata) -> list[Stage]:
        if metadata.precision == "int8":
            return [("quantize", lambda state: quantize_weights(state, 8, BLOCK_SIZE))]
        if metadata.precision == "int4":
            return [("quantize", lambda state: quantize_weights(state, 4, self.group_size))]
        return []

    def fork(self, state: OnnxGraph) -> OnnxGraph:
        graph = onnx.ModelProto()
        graph.CopyFrom(state.model)  # quantization rewrites the graph in place
        return OnnxGraph(graph, state.router_scopes, state.module_groups, state.top_k,
                         weights_dir=state.weights_dir)

    def transform(self, model: BiBoForCausalLM) -> FlatCacheDecoder:
        return FlatCacheDecoder(export_form(model, {MLPExperts: SkipUnselectedExperts,
                                                    SharedConvExpert: UnfoldedSharedExpert,
                                                    CacheWrite: lambda _: ScatterCacheWrite(),
                                                    GroupedAttention:
                                                        lambda _: SdpaGroupedAttention()})
                                ).eval()

    def export(self, decoder: FlatCacheDecoder) -> OnnxGraph:
        """torch.export → ONNX of the flat-cache decoder; batch and sequence length dynamic.
        The weights go straight to a temporary ``model.onnx.data``; the graph keeps
        references to them."""
        model, names = decoder.model, cache_names(decoder.model)
        ids = torch.zeros(2, 4, dtype=torch.long)  # an example 2×4 prompt at position 0
        pad = torch.tensor([0, 1])  # rows of different lengths: the padded graph
        cache = flatten_cache(model.new_cache(2, self.settings.max_length))
        dynamic = torch.export.Dim.DYNAMIC
        shapes = ({0: dynamic, 1: dynamic}, None, {0: dynamic}, tuple({0: dynamic} for _ in names))
        program = torch.onnx.export(
            decoder, (ids, torch.tensor(0), pad, *cache), dynamo=True, opset_version=OPSET,
            input_names=["input_ids", "start_pos", "pad", *names],
            output_names=["logits", *(PRESENT + name for name in names)],
            dynamic_shapes=shapes, verbose=False)
        weights = tempfile.TemporaryDirectory(prefix="bibo-onnx-")
        program.save(Path(weights.name) / ONNX_FILE, external_data=True)
        graph = onnx.load(Path(weights.name) / ONNX_FILE, load_external_data=False)
        return OnnxGraph(graph, router_names(decoder), module_groups(decoder),
                         model.config.num_experts_per_tok, weights_dir=weights)

    def save(self, state: OnnxGraph, folder: Path, metadata: ArtifactMetadata) -> list[str]:
        strip_debug_info(state.model)
        del state.model.metadata_props[:]
        onnx.helper.set_model_props(state.model, {METADATA_KEY: metadata.to_json()})
        if state.weights_dir is None:
            save_model(state.model, folder / ONNX_FILE)
        else:  # the graph already refers to model.onnx.data: place that file beside it
            onnx.save_model(state.model, folder / ONNX_FILE)
            # A copy: the ONNX checker refuses external data with several hard links.
            shutil.copyfile(Path(state.weights_dir.name) / ONNX_DATA_FILE, folder / ONNX_DATA_FILE)
        onnx.checker.check_model(folder / ONNX_FILE)  # the path form handles external data
        return [ONNX_FILE, ONNX_DATA_FILE]

    def inspect(self, state: OnnxGraph, folder: Path, precision: str) -> dict[str, Any]:
        facts: dict[str, Any] = {"opset": OPSET}
        if precision in INTEGER_PRECISIONS:
            kernels = integer_kernels(folder / ONNX_FILE)
            facts.update(quantization=state.quantization, integer_kernels=sum(kernels.values()),
                         integer_kernels_by_op=kernels)
        return facts

    def summary(self, manifest: dict[str, Any]) -> str:
        v = manifest["verification"]
        line = (f"[onnx] {manifest['precision']}: {manifest['total_bytes'] / 1e6:.1f} MB, vs "
                f"eager max|Δ| {v['max_abs']:.2e}, top-1 {v['top1_agreement']:.3f}, cosine "
                f"{v['cosine']:.4f}, greedy match {v['greedy_match']}")
        precision = manifest["precision"]
        if precision in INTEGER_PRECISIONS:
            met = v[f"{precision}_bars_met_on_random_prompts"]
            line += (f", {manifest['integer_kernels']} integer kernels, {precision} accuracy bars "
                     f"{'met' if met else 'not met'} on random prompts (judged on the task by "
                     "bibo-export parity)")
        return line + ", verified"


def export_onnx(source: str | Path | BiBoForCausalLM, outs: dict[str, str | Path],
                max_length: int | None = None, reference: BiBoForCausalLM | None = None,
                group_size: int = INT4_GROUP_SIZE) -> dict[str, dict[str, Any]]:
    """Export to one folder per precision (model.onnx, model.onnx.data, manifest.json), e.g.
    ``{"fp32": "artifacts/onnx/fp32", "int8": "artifacts/onnx/int8"}``, from one trace;
    ``group_size``: int4's weights per scale."""
    return run_export(OnnxRecipe, source, outs, max_length, reference=reference,
                      group_size=group_size)


# ------------------------------------------------------------------------------ attention
def trim_attention(state: OnnxGraph) -> OnnxGraph:
    """Each ``Attention`` over the cache reads only its first ``start_pos + T`` slots, those
    some query of the call can see: its keys, values and mask are sliced to them. The slots
    after are masked for every query, so the result is the same, but a decode step no longer
    reads the whole static cache in every layer (at the CLI's default maximum length, 2,048
    slots, about as many bytes as the `bench` model's int8 weights). A rewrite of the graph,
    not of the model: slicing there needs the length as a number (``.item()``), and the
    exporter's decomposition of ``torch.cond`` rejects the unbacked size that makes."""
    graph = state.model.graph
    end, constants = "attention.visible_slots", "attention.slice"
    graph.initializer.extend([numpy_helper.from_array(np.array([0]), f"{constants}.start"),
                              numpy_helper.from_array(np.array([2]), f"{constants}.slots"),
                              numpy_helper.from_array(np.array([-1]), f"{constants}.keys")])
    count = [onnx.helper.make_node("Shape", ["input_ids"], [f"{end}.call"], start=1, end=2),
             onnx.helper.make_node("Add", ["start_pos", f"{end}.call"], [end])]
    nodes, outputs = list(count), {output.name for output in graph.output}
    for node in graph.node:
        if node.op_type == "Attention" and node.input[1] in outputs:  # the new cache
            for index, axis in ((1, "slots"), (2, "slots"), (3, "keys"))[:len(node.input) - 1]:
                trimmed = f"{node.input[index]}.visible.{node.name}"
                nodes.append(onnx.helper.make_node(
                    "Slice", [node.input[index], f"{constants}.start", end,
                              f"{constants}.{axis}"], [trimmed], name=trimmed))
                node.input[index] = trimmed
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return state


# ------------------------------------------------------------------------------ quantize
def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W, transB=1)`` with a constant W and no bias as ``MatMul(x, Wᵀ)``.

    These are the Linears of experts that kept their ``If`` nodes (on 2-D tokens); the
    quantizer takes MatMul only.
    Returns the number of rewritten nodes.
    """
    weights = own_weights(model)
    count = 0
    for graph in subgraphs(model.graph):
        for node in graph.node:
            if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in weights:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if (attrs.get("alpha", 1.0), attrs.get("transA", 0), attrs.get("transB", 0)) \
                    != (1.0, 0, 1):  # beta is unused without a bias input
                continue
            weight = weights.pop(node.input[1])
            name = weight.name.removesuffix(".weight") + ".weight_t"
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name))
            node.input[1] = name
            node.op_type = "MatMul"
            del node.attribute[:]
            count += 1
    return count


def own_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Top-level initializers read by exactly one node: safe to rename or transpose."""
    readers: dict[str, int] = {}
    for graph in subgraphs(model.graph):
        for node in graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    return {init.name: init for init in model.graph.initializer if readers.get(init.name) == 1}


def module_scopes(node: onnx.NodeProto) -> list[str]:
    """The PyTorch modules a node was computed in, outermost first (the exporter's record)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            return ast.literal_eval(prop.value)[:-1]  # the last entry names the op itself
    return []


def name_linear_weights(model: onnx.ModelProto) -> None:
    """Name the folded (transposed) Linear weights after their module: ``….q_proj.weight_t``.

    The exporter calls them ``val_N``; module names make the quantization report readable.
    """
    weights = own_weights(model)
    for node in model.graph.node:
        scopes = module_scopes(node)
        if node.op_type == "MatMul" and node.input[1] in weights and scopes:
            weights[node.input[1]].name = node.input[1] = f"{scopes[-1]}.weight_t"


def router_nodes(state: OnnxGraph) -> list[str]:
    """Names of the nodes computed inside a router module (kept float)."""
    return [node.name for graph in subgraphs(state.model.graph) for node in graph.node
            if state.router_scopes & set(module_scopes(node))]


def quantize_weights(state: OnnxGraph, bits: int, block: int) -> OnnxGraph:
    """``bits``-bit (8 or 4) weights in blocks of ``block`` along the input with int8 compute
    on everything but the routers (the experts as QMoE nodes), and embedding tables of the same
    bits (``quantize_embedding_tables``)."""
    model = state.model
    if state.weights_dir is not None:
        onnx.load_external_data_for_model(model, state.weights_dir.name)
    fused = experts_to_qmoe(state, bits, block)
    rewritten = gemms_to_matmuls(model)
    name_linear_weights(model)
    tables = quantize_embedding_tables(model, block if bits == 4 else None)
    excluded = router_nodes(state)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=excluded)
    quantizer.process()  # in place: no second copy of the weights
    quantized = quantizer.model.model
    return OnnxGraph(quantized, state.router_scopes, state.module_groups, state.top_k,
                     {"qmoe_experts": fused, "gemms_rewritten": rewritten,
                      "float_router_nodes": excluded, "quantized_embedding_tables": tables,
                      "bits": bits, "block_size": block,
                      "quantized_weights": quantized_weights(state, quantized)})


# QMoE's form of BiBo's SwiGLU experts: ORT's swiglu is g · sigmoid(α g) · (u + β), so
# silu(g) · u at α = 1, β = 0; its CPU kernel takes each expert's gate and up rows interleaved
# (swiglu_fusion 1), and computes 8-bit blocks with int8 activations (accuracy_level 4).
QMOE_ATTRIBUTES = dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                       activation_beta=0.0, normalize_routing_weights=0, accuracy_level=4)
QMOE_MIN_BLOCK = 16  # QMoE's blocks are powers of two ≥ 16 that divide both expert dims
# QMoE's inputs, in order: (input, router_probs, fc1, fc1 scales, fc1 bias, fc2, fc2 scales,
# fc2 bias, fc3 and its scales and bias, three zero points, router_weights).
QMOE_ROUTER_WEIGHTS = 14


def experts_to_qmoe(state: OnnxGraph, bits: int, largest_block: int) -> list[str]:
    """Replace each experts module's chain of ``If`` nodes (one per expert) by one
    ``com.microsoft.QMoE`` node with ``bits``-bit expert weights in blocks of at most
    ``largest_block``; returns the modules' names.

    QMoE takes the routing as two [S, E] inputs: ``router_probs``, of which it runs each token's
    top k, and ``router_weights``, which mix their outputs. Both are the graph's gates (each
    chosen MLP expert's weight, 0 elsewhere), so a token runs the experts BiBo's router chose;
    where it chose parameter-free experts too, the rest of its k weigh 0, and the kernel skips
    experts at weight 0 (see ``weights_read_per_call``).
    """
    graph, fused = state.model.graph, []
    initializers = {init.name: init for init in graph.initializer}
    for scope in [name for name, group in state.module_groups.items() if group == "experts"]:
        nodes = [node for node in graph.node if scope in module_scopes(node)]
        gate, up, down = expert_projections(scope, nodes, initializers)
        block = qmoe_block_size(*gate.shape[1:], largest_block)
        if block is None:
            continue  # these experts keep their If nodes (see qmoe_block_size)
        flat, gates, output = experts_boundary(graph, nodes, initializers)
        fc1, fc1_scales = quantize_blocks(np.stack([gate, up], axis=2).reshape(
            gate.shape[0], -1, gate.shape[2]), block, bits)  # rows g₀, u₀, g₁, u₁, …
        fc2, fc2_scales = quantize_blocks(down, block, bits)
        weights = {f"{scope}.{name}": array for name, array in (
            ("fc1", fc1), ("fc1_scales", fc1_scales), ("fc2", fc2), ("fc2_scales", fc2_scales))}
        bounds = {f"{scope}.mlp_gates_{name}": np.array([value])  # gates[:, :E]
                  for name, value in (("start", 0), ("end", gate.shape[0]), ("axis", 1))}
        graph.initializer.extend(numpy_helper.from_array(array, name)
                                 for name, array in {**weights, **bounds}.items())
        fc1_inputs, fc2_inputs = list(weights)[:2], list(weights)[2:]
        mlp_gates = f"{scope}.mlp_gates"
        inputs = [flat, mlp_gates, *fc1_inputs, "", *fc2_inputs]
        inputs += [""] * (QMOE_ROUTER_WEIGHTS - len(inputs)) + [mlp_gates]
        replacement = [
            onnx.helper.make_node("Slice", [gates, *bounds], [mlp_gates], name=mlp_gates),
            onnx.helper.make_node("QMoE", inputs, [output], name=f"{scope}.qmoe",
                                  domain="com.microsoft", k=min(state.top_k, gate.shape[0]),
                                  block_size=block, expert_weight_bits=bits,
                                  **QMOE_ATTRIBUTES)]
        replace_nodes(graph, nodes, replacement)
        fused.append(scope)
    if fused:
        if "com.microsoft" not in {opset.domain for opset in state.model.opset_import}:
            state.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        drop_unread_initializers(state.model)
    return fused


def expert_projections(scope: str, nodes: list[onnx.NodeProto],
                       initializers: dict[str, onnx.TensorProto]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gate, up [E, m, h] and down [E, h, m] of the experts module ``scope``, found by their
    parameter names (``{scope}.ffns.{e}.{gate|up|down}_proj.weight``, [out, in])."""
    pattern = re.compile(re.escape(scope) + r"\.ffns\.(\d+)\.(gate|up|down)_proj\.weight$")
    found: dict[str, dict[int, np.ndarray]] = {"gate": {}, "up": {}, "down": {}}
    for name in {name for node in nodes for name in reads(node)}:
        match = pattern.match(name)
        if match:
            found[match[2]][int(match[1])] = numpy_helper.to_array(initializers[name])
    count = len(found["gate"])
    if not count or any(sorted(weights) != list(range(count)) for weights in found.values()):
        raise RuntimeError(f"cannot find the expert weights of {scope} in the ONNX graph")
    return tuple(np.stack([found[p][e] for e in range(count)])  # type: ignore[return-value]
                 for p in ("gate", "up", "down"))


def experts_boundary(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                     initializers: dict[str, onnx.TensorProto]) -> tuple[str, str, str]:
    """(flat tokens, gates, output): the values an experts module's nodes read from the rest of
    the graph and the one they give it. The gates are what its slice to the MLP experts reads."""
    inside = {name for node in nodes for name in node.output}
    outer = {name for node in nodes for name in reads(node)} - inside - set(initializers) - {""}
    read_after = {name for node in graph.node if node.output[0] not in inside
                  for name in reads(node)}
    outputs = inside & (read_after | {o.name for o in graph.output})
    slices = [node.input[0] for node in nodes if node.op_type == "Slice"]
    if len(outer) != 2 or len(outputs) != 1 or len(slices) != 1 or slices[0] not in outer:
        raise RuntimeError("cannot find the inputs and output of an experts module in the "
                           f"ONNX graph: reads {sorted(outer)}, gives {sorted(outputs)}")
    (flat,) = outer - {slices[0]}
    return flat, slices[0], outputs.pop()


def reads(node: onnx.NodeProto) -> set[str]:
    """The values ``node`` reads, those its subgraphs read from outside them included."""
    names = set(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            inner = {name for n in attr.g.node for name in reads(n)}
            made = {name for n in attr.g.node for name in n.output}
            names |= inner - made - {init.name for init in attr.g.initializer}
    return names


def replace_nodes(graph: onnx.GraphProto, old: list[onnx.NodeProto],
                  new: list[onnx.NodeProto]) -> None:
    """``new`` in place of ``old``, where ``old`` computed ``new``'s last output: everything that
    node depended on, so all ``old`` read, is computed before it."""
    output = new[-1].output[0]
    removed = {name for node in old for name in node.output}  # SSA: outputs name their node
    nodes = []
    for node in graph.node:
        if output in node.output:
            nodes.extend(new)
        elif node.output[0] not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Remove the top-level initializers no node reads (the float weights a rewrite replaced),
    by index: comparing tensors to find them would compare their data."""
    read = {name for graph in subgraphs(model.graph) for node in graph.node
            for name in node.input}
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name not in read:
            del initializers[index]


def qmoe_block_size(width: int, hidden: int, largest: int) -> int | None:
    """The largest block QMoE can take for experts of this shape, at most ``largest``; None
    where no block fits (the `reference` preset's width 684). Those experts keep their ``If``
    nodes: QMoE with one scale per row instead decoded `reference` at 25.0 tokens/s against
    33.9 with the ``If`` nodes (int8, 1 thread, 2026-11-27)."""
    block = largest
    while block >= QMOE_MIN_BLOCK and (width % block or hidden % block):
        block //= 2
    return block if block >= QMOE_MIN_BLOCK else None


def quantize_blocks(weights: np.ndarray, block: int,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
    """[E, N, K] float → ([E, N, K · bits / 8] uint8, [E, N, K / block] scales): ORT's own
    symmetric block quantization, MatMulNBits' (zero point 128 at 8 bits, 8 at 4, where two
    weights share a byte)."""
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, bits=bits))
    blocks = [quantizer.qbits_block_quant(np.ascontiguousarray(w.T))[:2] for w in weights]
    return (np.stack([q.reshape(q.shape[0], -1) for q, _ in blocks]),
            np.stack([scales for _, scales in blocks]).astype(np.float32))


def quantize_embedding_tables(model: onnx.ModelProto,
                              group_size: int | None = None) -> list[str]:
    """Replace each embedding lookup ``Gather(table, ids)`` of a float table by a quantized one;
    returns the quantized tables' names.

    Without ``group_size``: int8 with one scale per row, ``Gather(q, ids) → Cast →
    Mul(Gather(scales, ids))``. ORT's quantizers have no per-row form for Gather (one scale for
    the whole table); at a vocabulary of 128k the table is a quarter of the model, so it gets
    symmetric per-row quantization (``quantize_rows``), the same scheme as ExecuTorch's
    ``embedding_byte``. With ``group_size`` (int4 exports): ORT's ``GatherBlockQuantized``, 4
    bits in [-8, 7] with a scale per ``group_size`` weights of a row (``quantize_groups``, the
    scheme of ExecuTorch's ``embedding_4bit``), for tables whose width is a multiple of the
    group; others stay int8.
    """
    weights = own_weights(model)
    graph, done = model.graph, []
    for position, node in reversed(list(enumerate(graph.node))):
        table = weights.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        # A copy: to_array views the tensor's read-only bytes, which torch warns of.
        values = torch.tensor(numpy_helper.to_array(table))
        if group_size is not None and table.dims[1] % group_size == 0:
            lookup = table_4bit(graph, node, table, values, group_size)
        else:
            lookup = table_int8(graph, node, table, values)
        graph.node.remove(node)
        for offset, new in enumerate(lookup):
            graph.node.insert(position + offset, new)
        done.append(table.name.removesuffix("_quantized"))
    return done


def table_int8(graph: onnx.GraphProto, node: onnx.NodeProto, table: onnx.TensorProto,
               values: torch.Tensor) -> list[onnx.NodeProto]:
    """``table`` as int8 rows in place, its scales added to ``graph``; the lookup's nodes."""
    rows, scales = quantize_rows(values)
    name, ids, out = table.name, node.input[1], node.output[0]
    table.CopyFrom(numpy_helper.from_array(rows.numpy(), f"{name}_quantized"))
    graph.initializer.append(numpy_helper.from_array(scales[:, None].numpy(), f"{name}_scale"))
    return [onnx.helper.make_node("Gather", [f"{name}_quantized", ids], [f"{out}_int8"],
                                  name=f"{node.name}_int8"),
            onnx.helper.make_node("Cast", [f"{out}_int8"], [f"{out}_unscaled"],
                                  to=onnx.TensorProto.FLOAT, name=f"{node.name}_cast"),
            onnx.helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_scale"],
                                  name=f"{node.name}_scale"),
            onnx.helper.make_node("Mul", [f"{out}_unscaled", f"{out}_scale"], [out],
                                  name=f"{node.name}_dequantize")]


def table_4bit(graph: onnx.GraphProto, node: onnx.NodeProto, table: onnx.TensorProto,
               values: torch.Tensor, group_size: int) -> list[onnx.NodeProto]:
    """``table`` as 4-bit groups in place, its scales added to ``graph``; the lookup's node."""
    q, scales = quantize_groups(values, group_size)
    name = table.name
    # GatherBlockQuantized reads uint8 nibbles with the zero point 8 (offset binary), where
    # pack_int4 writes two's complement: flipping each nibble's top bit converts.
    table.CopyFrom(numpy_helper.from_array((pack_int4(q) ^ 0x88).numpy(), f"{name}_quantized"))
    graph.initializer.append(numpy_helper.from_array(scales.numpy(), f"{name}_scale"))
    return [onnx.helper.make_node(
        "GatherBlockQuantized", [f"{name}_quantized", node.input[1], f"{name}_scale"],
        node.output, name=f"{node.name}_4bit", domain="com.microsoft", bits=4,
        block_size=group_size, gather_axis=0, quantize_axis=1)]


def quantized_weights(state: OnnxGraph, model: onnx.ModelProto) -> dict[str, list[str]]:
    """Quantized weights (MatMulNBits', QMoE's and the tables') grouped by the kind of module
    they belong to."""
    names = [init.name for graph in subgraphs(model.graph) for init in graph.initializer
             if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
             and init.name.endswith("_quantized")]
    names += [node.input[1] for graph in subgraphs(model.graph) for node in graph.node
              if node.op_type == "MatMulNBits"]
    names += [node.input[i] for node in model.graph.node if node.op_type == "QMoE"
              for i in (2, 5)]
    groups: dict[str, list[str]] = {}
    for name in names:
        # The outermost typed module: an expert's own SwiGLU counts as the experts.
        owner = min((prefix for prefix in state.module_groups if name.startswith(prefix + ".")),
                    key=len, default="")
        groups.setdefault(state.module_groups.get(owner, "other"), []).append(name)
    return groups


def module_groups(decoder: FlatCacheDecoder) -> dict[str, str]:
    """Qualified module name → the part of the model it is, by module type."""
    kinds = [(SkipUnselectedExperts, "experts"), (UnfoldedSharedExpert, "shared_expert"),
             (Attention, "attention"), (SwiGLU, "dense_ffn"), (Router, "router"),
             (nn.Embedding, "embedding")]
    groups = {name: group for name, module in decoder.named_modules()
              for kind, group in kinds if isinstance(module, kind)}
    groups.update((name, "lm_head") for name, module in decoder.named_modules()
                  if module is decoder.model.lm_head)
    return groups


# ------------------------------------------------------------------------------ save
def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scopes: about 1 MB of text per model."""
    for graph in subgraphs(model.graph):
        for node in graph.node:
            del node.metadata_props[:]


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """``path`` plus one external data file (``<name>.data``) holding the weights; the
    weights leave ``model``'s memory as they are written."""
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


# ------------------------------------------------------------------------------ verify
def integer_kernels(path: Path) -> dict[str, int]:
    """Op counts, If branches included, of the graph ORT actually runs after its fusions."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # ORT warns that a saved optimized graph is specific to this machine: it is only read
        # here, to count its kernels.
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for graph in subgraphs(optimized.graph):
        for node in graph.node:
            if node.op_type in INTEGER_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ------------------------------------------------------------------------------ decode cost
def node_weights(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Node name → {weight initializer it reads: bytes}, If branches included."""
    graphs = list(subgraphs(model.graph))
    sizes = {init.name: tensor_bytes(init) for graph in graphs for init in graph.initializer}
    return {node.name: {name: sizes[name] for name in node.input if name in sizes}
            for graph in graphs for node in graph.node}


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def weights_read_per_call(folder: str | Path, input_ids: np.ndarray,
                          max_new_tokens: int) -> list[dict[str, int]]:
    """Generate with ORT's profiler on and return, per session run (prefill, then each decode
    step), the weights that the nodes ORT actually executed read, in bytes.

    Nodes inside an ``If`` branch that was not taken never run, so unselected experts are
    absent. A Gather reads only the rows it looks up (one per token), not its whole table. A
    QMoE node reads the experts some token gave a nonzero weight (its CPU kernel skips the
    others: with 2 of 4 weights zero a call took 0.6× the time, with none 0.14×; 2026-11-26),
    which the profiled copy of the graph also outputs.
    """
    folder = Path(folder)
    model = onnx.load(folder / ONNX_FILE, load_external_data=False)
    weights = node_weights(model)
    qmoe = {node.name: node for node in model.graph.node if node.op_type == "QMoE"}
    with tempfile.TemporaryDirectory() as tmp:
        source = folder
        if qmoe:  # a copy of the graph that also outputs each QMoE node's routing weights
            for node in qmoe.values():
                model.graph.output.append(
                    onnx.ValueInfoProto(name=node.input[QMOE_ROUTER_WEIGHTS]))
            source = Path(tmp)
            onnx.save_model(model, source / ONNX_FILE)
            if (folder / ONNX_DATA_FILE).exists():  # ORT refuses a link to outside the folder
                shutil.copyfile(folder / ONNX_DATA_FILE, source / ONNX_DATA_FILE)
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        runtime = ExpertCountingRuntime.from_path(source, check=False, options=options)
        runtime.generate(input_ids, max_new_tokens)
        events = json.loads(Path(runtime.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "model_run")
    calls: list[dict[str, int]] = [{} for _ in runs]
    for event in events:
        if event.get("cat") != "Node":
            continue
        node = event["name"].removesuffix("_kernel_time").split("/")[0]
        call = next(i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end)
        for name, size in weights.get(node, {}).items():
            if event["args"].get("op_name") in LOOKUPS:  # an embedding lookup reads its rows
                table = event["args"]["input_type_shape"][0]
                rows = int(np.prod(next(iter(event["args"]["output_type_shape"][0].values()))[:-1]))
                size = size // next(iter(table.values()))[0] * rows
            elif node in qmoe:  # every weight it reads is an expert's
                ran = runtime.experts_run[call][list(qmoe).index(node)]
                size = size * ran // node_experts(model, qmoe[node])
            calls[call][name] = size
    return calls


class ExpertCountingRuntime(OnnxRuntime):
    """``OnnxRuntime`` on a graph whose outputs end with its QMoE nodes' routing weights
    ([S, E] each): records, per run, how many experts each QMoE node ran."""

    def __init__(self, session: ort.InferenceSession, metadata: ArtifactMetadata,
                 in_place: frozenset[str] = frozenset()) -> None:
        super().__init__(session, metadata, in_place)
        self.experts_run: list[list[int]] = []  # per run, per QMoE node

    def _run(self, binding: ort.IOBinding) -> None:
        super()._run(binding)
        self.experts_run.append([int((r.numpy() != 0).any(0).sum()) for r in self.extra_outputs])


def node_experts(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """E of a QMoE node: the leading dimension of its fc1 weights."""
    return next(init.dims[0] for init in model.graph.initializer if init.name == node.input[2])
