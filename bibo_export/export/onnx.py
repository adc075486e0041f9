"""ONNX export: prepare → export → quantize → save → verify, with ``manifest.json`` last.

One graph serves prefill and decode: ``(input_ids [B, T], start_pos [], *cache) → (logits,
*new cache)``, the KV cache and conv states explicit inputs/outputs of static length
``max_length``. Experts run under ``torch.cond`` (ONNX ``If``), so a decode step runs only the
experts some token selected.

int8 is ORT dynamic quantization (int8 per-channel weights, uint8 dynamic activations) of every
constant-weight MatMul and Conv except the router's, which stays float: a routing flip is a
discrete, unbounded error (DESIGN §6). Two graph facts make the experts reachable:
``nn.Linear`` on the MoE's flat 2-D tokens exports as ``Gemm``, which ``quantize_dynamic``
skips, so those Gemms are rewritten to ``MatMul`` first; and the experts live in ``If``
subgraphs, which the quantizer only enters with ``EnableSubgraph``.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch
from onnx import numpy_helper

import bibo_export

from ..io import atomic_directory
from ..model import BiBoForCausalLM
from ..parity import BARS, compare_generation, compare_logits
from .manifest import check_manifest, write_manifest
from .prepare import FlatCacheDecoder, cache_names, flatten_cache, prepare_for_export
from .stages import stage

OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Integer kernels ORT runs for dynamically quantized MatMul/Conv (after its own fusions).
INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger")
ROUTER_SCOPE = re.compile(r"layers\.\d+\.mlp$")  # the router is computed in the MoE's own scope


# ------------------------------------------------------------------------------ export
def decoder_args(model: BiBoForCausalLM, max_length: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: a 2×4 prompt at position 0 and an empty cache of ``max_length``."""
    ids = torch.zeros(2, 4, dtype=torch.long)
    return (ids, torch.tensor(0), *flatten_cache(model.new_cache(2, max_length)))


def export_graph(model: BiBoForCausalLM, max_length: int) -> onnx.ModelProto:
    """torch.export → ONNX of the flat-cache decoder; batch and sequence length are dynamic."""
    decoder = FlatCacheDecoder(prepare_for_export(model, "skip-unselected")).eval()
    names = cache_names(model)
    dynamic = torch.export.Dim.DYNAMIC
    shapes = ({0: dynamic, 1: dynamic}, None, tuple({0: dynamic} for _ in names))
    program = torch.onnx.export(
        decoder, decoder_args(model, max_length), dynamo=True, opset_version=OPSET,
        input_names=["input_ids", "start_pos", *names],
        output_names=["logits", *(f"present.{name}" for name in names)],
        dynamic_shapes=shapes, verbose=False)
    return program.model_proto


# ------------------------------------------------------------------------------ quantize
def subgraphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in its nodes (If branches), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W, transB=1)`` with a constant W and no bias as ``MatMul(x, Wᵀ)``.

    These are the expert Linears on 2-D tokens; ``quantize_dynamic`` quantizes MatMul only.
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


def module_of(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from (the exporter's name scopes), or ''."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)[-2]
    return ""


def name_linear_weights(model: onnx.ModelProto) -> None:
    """Name the folded (transposed) Linear weights after their module: ``….q_proj.weight_t``.

    The exporter calls them ``val_N``; module names make the quantization report readable.
    """
    weights = own_weights(model)
    for node in model.graph.node:
        module = module_of(node)
        if node.op_type == "MatMul" and node.input[1] in weights and module.startswith("model."):
            if ROUTER_SCOPE.search(module):
                module += ".router"
            weights[node.input[1]].name = node.input[1] = f"{module}.weight_t"


def router_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computing router logits (kept float)."""
    return [node.name for node in model.graph.node
            if node.op_type in ("MatMul", "Conv") and ROUTER_SCOPE.search(module_of(node))]


def quantize_int8(model: onnx.ModelProto,
                  workdir: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Dynamic int8 quantization of everything but the router; returns (model, report)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rewritten = gemms_to_matmuls(model)
    name_linear_weights(model)
    excluded = router_nodes(model)
    src, dst = workdir / "float.onnx", workdir / "int8.onnx"
    save_model(model, src)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Conv"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                     extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    quantized = onnx.load(dst)
    return quantized, {"gemms_rewritten": rewritten, "float_router_nodes": excluded,
                       "quantized_weights": quantized_weights(quantized)}


def quantized_weights(model: onnx.ModelProto) -> dict[str, list[str]]:
    """int8 weight initializers grouped by model part (experts, attention, lm_head, ...)."""
    groups: dict[str, list[str]] = {}
    for graph in subgraphs(model.graph):
        for init in graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized"):
                groups.setdefault(weight_group(init.name), []).append(init.name)
    return groups


def weight_group(name: str) -> str:
    for key, group in (("expert_ffns", "experts"), ("shared_expert", "shared_expert"),
                       ("self_attn", "attention"), ("lm_head", "lm_head"),
                       ("router", "router"), ("mlp", "dense_ffn")):
        if key in name:
            return group
    return "other"


# ------------------------------------------------------------------------------ save
def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scopes: about 1 MB of text per model."""
    for graph in subgraphs(model.graph):
        for node in graph.node:
            del node.metadata_props[:]


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """``path`` plus one external data file (``<name>.data``) holding the weights."""
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def set_metadata(model: onnx.ModelProto, model_config: dict, max_length: int,
                 precision: str) -> None:
    """The config and versions travel inside the model (ORT's custom metadata map)."""
    fields = {"bibo.config": json.dumps(model_config), "bibo.max_length": str(max_length),
              "bibo.precision": precision, **{f"version.{k}": v for k, v in versions().items()}}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, fields)


def versions() -> dict[str, str]:
    return {"bibo_export": bibo_export.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": ort.__version__}


# ------------------------------------------------------------------------------ verify
def integer_kernels(path: Path) -> dict[str, int]:
    """Op counts, If branches included, of the graph ORT actually runs after its fusions."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for graph in subgraphs(optimized.graph):
        for node in graph.node:
            if node.op_type in INTEGER_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def verify(folder: Path, model: BiBoForCausalLM, precision: str, max_length: int,
           seed: int = 0) -> dict[str, Any]:
    """Run the written export against eager on seeded random prompts and apply DESIGN §7.

    fp32 must match logits to 1e-4 with identical greedy tokens. int8 must run integer
    kernels; its accuracy bars are meant for a trained model on its task's data (``bibo-export
    parity``), so on these random prompts they are recorded (``int8_bars_met``), not enforced.
    """
    from ..runtimes.eager import EagerRuntime
    from ..runtimes.onnx import OnnxRuntime

    candidate = OnnxRuntime.from_folder(folder, check=False)
    reference = EagerRuntime(model, max_length)
    rng = np.random.default_rng(seed)
    length = min(16, max_length // 2)
    prompts = rng.integers(0, model.config.vocab_size, (2, length), dtype=np.int64)
    result = {**compare_logits(candidate.logits(prompts), reference.logits(prompts)),
              **compare_generation(candidate, reference, prompts[:, : length // 2],
                                   min(16, max_length - length // 2))}
    if precision == "fp32":
        passed = result["max_abs"] <= BARS["onnx-fp32"]["max_abs"] and result["greedy_match"]
    else:
        bars = BARS["int8"]
        result["int8_bars_met"] = (result["cosine"] >= bars["cosine"]
                                   and result["top1_agreement"] >= bars["top1_agreement"])
        result["integer_kernels"] = integer_kernels(folder / MODEL_FILE)
        passed = bool(result["integer_kernels"])
    return {**result, "prompts": list(prompts.shape), "passed": passed}


# ------------------------------------------------------------------------------ pipeline
def export_onnx(checkpoint: str | Path, out: str | Path, int8: bool = False,
                max_length: int | None = None, require_parity: bool = True) -> dict[str, Any]:
    """Export a checkpoint folder to ``out`` (model.onnx, model.onnx.data, manifest.json).

    ``max_length`` (prompt + generated tokens; default the model's maximum) sizes the cache.
    The export verifies itself against eager; with ``require_parity`` a failed check raises
    ``ValueError`` and leaves any previous export in ``out`` untouched. Returns the manifest.
    """
    precision = "int8" if int8 else "fp32"
    return export_onnx_precisions(checkpoint, {precision: out}, max_length,
                                  require_parity)[precision]


def export_onnx_precisions(checkpoint: str | Path, outs: dict[str, str | Path],
                           max_length: int | None = None,
                           require_parity: bool = True) -> dict[str, dict[str, Any]]:
    """Like ``export_onnx`` for several precisions ("fp32", "int8") from one trace, e.g.
    ``{"fp32": "artifacts/onnx/fp32", "int8": "artifacts/onnx/int8"}``; returns the manifests."""
    unknown = set(outs) - {"fp32", "int8"}
    if unknown or not outs:
        raise ValueError(f"precisions must be fp32 and/or int8, got {sorted(outs)}")
    with stage("onnx", "prepare"):
        model = BiBoForCausalLM.from_pretrained(checkpoint).eval()
        max_length = check_max_length(model, max_length)
    with stage("onnx", "export"):
        graph = export_graph(model, max_length)
    manifests = {}
    for precision, out in outs.items():
        variant = onnx.ModelProto()
        variant.CopyFrom(graph)  # quantization rewrites the graph in place
        manifests[precision] = save_and_verify(variant, model, Path(out), precision, max_length,
                                               require_parity, checkpoint=str(checkpoint))
    return manifests


def save_and_verify(graph: onnx.ModelProto, model: BiBoForCausalLM, out: Path, precision: str,
                    max_length: int, require_parity: bool, **fields: Any) -> dict[str, Any]:
    """quantize (int8) → save → verify → manifest, all inside a folder that replaces ``out``
    only once everything succeeded."""
    with atomic_directory(out) as folder, tempfile.TemporaryDirectory() as workdir:
        if precision == "int8":
            with stage("onnx", "quantize"):
                graph, fields["quantization"] = quantize_int8(graph, Path(workdir))
        with stage("onnx", f"save {precision}"):
            strip_debug_info(graph)
            set_metadata(graph, model.config.to_dict(), max_length, precision)
            save_model(graph, folder / MODEL_FILE)
            onnx.checker.check_model(folder / MODEL_FILE)  # the path form handles external data
        with stage("onnx", f"verify {precision}"):
            verification = verify(folder, model, precision, max_length)
        if require_parity and not verification["passed"]:
            raise ValueError(f"ONNX {precision} export failed verification against eager: "
                             f"{json.dumps(verification)}")
        write_manifest(folder, [MODEL_FILE, DATA_FILE], format="onnx", precision=precision,
                       opset=OPSET, max_length=max_length, versions=versions(),
                       verification=verification, **fields)
    return check_manifest(out)


def check_max_length(model: BiBoForCausalLM, max_length: int | None) -> int:
    limit = model.config.max_position_embeddings
    if max_length is None:
        return limit
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in [2, {limit}], got {max_length!r}")
    return max_length


def summary(manifest: dict[str, Any]) -> str:
    """One line for the CLI: precision, size and the verification against eager."""
    v = manifest["verification"]
    line = (f"onnx {manifest['precision']}: {manifest['total_bytes'] / 1e6:.1f} MB, vs eager "
            f"max|Δ| {v['max_abs']:.2e}, top-1 {v['top1_agreement']:.3f}, cosine "
            f"{v['cosine']:.4f}, greedy match {v['greedy_match']}")
    if "integer_kernels" in v:
        line += (f", integer kernels {v['integer_kernels']}, int8 bars "
                 f"{'met' if v['int8_bars_met'] else 'not met'} on random prompts (judged on "
                 "the task by bibo-export parity)")
    return line + (", verified" if v["passed"] else ", FAILED the DESIGN §7 bars")
