"""ONNX export recipe: transform → export → quantize (int8) → save, run by ``pipeline``.

One graph serves prefill and decode: ``(input_ids [B, T], start_pos [], *cache) → (logits,
*new cache)``, the KV cache and conv states explicit inputs/outputs of static length
``max_length``. Experts run under ``torch.cond`` (ONNX ``If``), so a decode step runs only the
experts some token selected. fp32 and int8 come from one trace.

int8 is ORT's ``MatMulNBits`` (8-bit weights in blocks of ``BLOCK_SIZE`` along the input, one
fp32 scale per block; ``accuracy_level`` 4: int8 compute, each row of the activations quantized
on its own) on every constant-weight MatMul except the routers', plus int8 embedding tables with
per-row scales (``quantize_embedding_tables``). Per-row activation scales are why: ORT's dynamic
quantization (``DynamicQuantizeMatMul``) gives one activation scale to a whole call, and on a
text model the SwiGLU outputs entering the down projections carry outliers that cost every other
token its precision (``text-tiny`` on 2,048 held-out positions, 2026-11-26: top-1 agreement
97.3 % with one scale per call, 99.0 % per row; ExecuTorch's 8da8w, per token, 99.6 %). The
routers stay float: a routing flip is a discrete, unbounded error (DESIGN §6). The router nodes
are the ones the exporter recorded as computed inside a ``Router`` module (found by type, not by
name). ``nn.Linear`` on the MoE's flat 2-D tokens exports as ``Gemm``, which the quantizer skips,
so those Gemms are rewritten to ``MatMul`` first; the quantizer enters the experts' ``If``
subgraphs itself.
"""

from __future__ import annotations

import ast
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from torch import nn

from ..artifacts import ONNX_DATA_FILE, ONNX_FILE, ArtifactMetadata
from ..kernels.moe_experts import quantize_rows
from ..model import BiBoForCausalLM
from ..model.attention import Attention
from ..model.layers import CacheWrite, SwiGLU
from ..model.moe import MLPExperts, Router, SharedConvExpert
from ..runtimes.onnx import METADATA_KEY, OnnxRuntime
from .decoders import FlatCacheDecoder, cache_names, flatten_cache
from .pipeline import Recipe, Stage, run_export
from .transforms import (ScatterCacheWrite, SkipUnselectedExperts, UnfoldedSharedExpert,
                         export_form, router_names)

OPSET = 18
# The integer kernel ORT runs for the quantized MatMuls (after its own fusions).
INTEGER_OPS = ("MatMulNBits",)
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
    quantization: dict[str, Any] | None = field(default=None)
    # Where the graph's weights are while they are external (model.onnx.data): the export
    # streams them to disk, so no second in-memory copy (3 GB at 750M parameters) is built.
    # None once they are in the graph itself (after quantization).
    weights_dir: tempfile.TemporaryDirectory | None = None


class OnnxRecipe(Recipe):
    format = "onnx"
    versions_of = ("onnx", "onnxscript", "onnxruntime")

    def shared_stages(self) -> list[Stage]:
        return [("transform", self.transform), ("export", self.export)]

    def output_stages(self, metadata: ArtifactMetadata) -> list[Stage]:
        return [("quantize", quantize_int8)] if metadata.precision == "int8" else []

    def fork(self, state: OnnxGraph) -> OnnxGraph:
        graph = onnx.ModelProto()
        graph.CopyFrom(state.model)  # quantization rewrites the graph in place
        return OnnxGraph(graph, state.router_scopes, state.module_groups,
                         weights_dir=state.weights_dir)

    def transform(self, model: BiBoForCausalLM) -> FlatCacheDecoder:
        return FlatCacheDecoder(export_form(model, {MLPExperts: SkipUnselectedExperts,
                                                    SharedConvExpert: UnfoldedSharedExpert,
                                                    CacheWrite: lambda _: ScatterCacheWrite()})
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
            output_names=["logits", *(f"present.{name}" for name in names)],
            dynamic_shapes=shapes, verbose=False)
        weights = tempfile.TemporaryDirectory(prefix="bibo-onnx-")
        program.save(Path(weights.name) / ONNX_FILE, external_data=True)
        graph = onnx.load(Path(weights.name) / ONNX_FILE, load_external_data=False)
        return OnnxGraph(graph, router_names(decoder), module_groups(decoder),
                         weights_dir=weights)

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
        if precision == "int8":
            kernels = integer_kernels(folder / ONNX_FILE)
            facts.update(quantization=state.quantization, integer_kernels=sum(kernels.values()),
                         integer_kernels_by_op=kernels)
        return facts

    def summary(self, manifest: dict[str, Any]) -> str:
        v = manifest["verification"]
        line = (f"[onnx] {manifest['precision']}: {manifest['total_bytes'] / 1e6:.1f} MB, vs "
                f"eager max|Δ| {v['max_abs']:.2e}, top-1 {v['top1_agreement']:.3f}, cosine "
                f"{v['cosine']:.4f}, greedy match {v['greedy_match']}")
        if manifest["precision"] == "int8":
            line += (f", {manifest['integer_kernels']} integer kernels, int8 accuracy bars "
                     f"{'met' if v['int8_bars_met_on_random_prompts'] else 'not met'} on random "
                     "prompts (judged on the task by bibo-export parity)")
        return line + ", verified"


def export_onnx(source: str | Path | BiBoForCausalLM, outs: dict[str, str | Path],
                max_length: int | None = None,
                reference: BiBoForCausalLM | None = None) -> dict[str, dict[str, Any]]:
    """Export to one folder per precision (model.onnx, model.onnx.data, manifest.json), e.g.
    ``{"fp32": "artifacts/onnx/fp32", "int8": "artifacts/onnx/int8"}``, from one trace."""
    return run_export(OnnxRecipe, source, outs, max_length, reference=reference)


# ------------------------------------------------------------------------------ quantize
def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes (If branches), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W, transB=1)`` with a constant W and no bias as ``MatMul(x, Wᵀ)``.

    These are the expert Linears on 2-D tokens; the quantizer takes MatMul only.
    Returns the number of rewritten nodes.
    """
    weights = own_weights(model)
    count = 0
    for graph in subgraphs(model.graph):
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            plain = (attrs.get("alpha", 1.0) == 1.0 and attrs.get("transA", 0) == 0
                     and attrs.get("transB", 0) == 1)  # beta is unused without a bias input
            if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in weights \
                    or not plain:
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


def quantize_int8(state: OnnxGraph) -> OnnxGraph:
    """8-bit block-quantized weights with int8 compute on everything but the routers, and int8
    embedding tables."""
    model = state.model
    if state.weights_dir is not None:
        onnx.load_external_data_for_model(model, state.weights_dir.name)
    rewritten = gemms_to_matmuls(model)
    name_linear_weights(model)
    tables = quantize_embedding_tables(model)
    excluded = router_nodes(state)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=excluded)
    quantizer.process()  # in place: no second copy of the weights
    quantized = quantizer.model.model
    return OnnxGraph(quantized, state.router_scopes, state.module_groups,
                     {"gemms_rewritten": rewritten, "float_router_nodes": excluded,
                      "int8_embedding_tables": tables, "block_size": BLOCK_SIZE,
                      "quantized_weights": quantized_weights(state, quantized)})


def quantize_embedding_tables(model: onnx.ModelProto) -> list[str]:
    """Replace each embedding lookup ``Gather(table, ids)`` of a float table by an int8 table
    with one scale per row: ``Gather(q, ids) → Cast → Mul(Gather(scales, ids))``.

    ORT's quantizers have no per-row form for Gather (one scale for the whole table); at a
    vocabulary of 128k the table is a quarter of the model, so it gets symmetric per-row
    quantization (``quantize_rows``), the same scheme as ExecuTorch's ``embedding_byte``.
    Returns the quantized tables' names.
    """
    weights = own_weights(model)
    graph, done = model.graph, []
    for position, node in reversed(list(enumerate(graph.node))):
        table = weights.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        rows, scales = quantize_rows(torch.from_numpy(numpy_helper.to_array(table)))
        name, ids, out = table.name, node.input[1], node.output[0]
        table.CopyFrom(numpy_helper.from_array(rows.numpy(), f"{name}_quantized"))
        graph.initializer.append(numpy_helper.from_array(scales[:, None].numpy(),
                                                         f"{name}_scale"))
        lookup = [onnx.helper.make_node("Gather", [f"{name}_quantized", ids], [f"{out}_int8"],
                                        name=f"{node.name}_int8"),
                  onnx.helper.make_node("Cast", [f"{out}_int8"], [f"{out}_unscaled"],
                                        to=onnx.TensorProto.FLOAT, name=f"{node.name}_cast"),
                  onnx.helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_scale"],
                                        name=f"{node.name}_scale"),
                  onnx.helper.make_node("Mul", [f"{out}_unscaled", f"{out}_scale"], [out],
                                        name=f"{node.name}_dequantize")]
        graph.node.remove(node)
        for offset, new in enumerate(lookup):
            graph.node.insert(position + offset, new)
        done.append(name)
    return done


def quantized_weights(state: OnnxGraph, model: onnx.ModelProto) -> dict[str, list[str]]:
    """8-bit weights (MatMulNBits' and the int8 tables) grouped by the kind of module they
    belong to."""
    names = [init.name for graph in subgraphs(model.graph) for init in graph.initializer
             if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized")]
    names += [node.input[1] for graph in subgraphs(model.graph) for node in graph.node
              if node.op_type == "MatMulNBits"]
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
    absent. A Gather reads only the rows it looks up (one per token), not its whole table.
    """
    folder = Path(folder)
    weights = node_weights(onnx.load(folder / ONNX_FILE, load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        runtime = OnnxRuntime.from_path(folder, check=False, options=options)
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
            if event["args"].get("op_name") == "Gather":  # an embedding lookup reads its rows
                table = event["args"]["input_type_shape"][0]
                rows = int(np.prod(next(iter(event["args"]["output_type_shape"][0].values()))[:-1]))
                size = size // next(iter(table.values()))[0] * rows
            calls[call][name] = size
    return calls
