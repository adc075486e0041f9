"""ExecuTorch export recipe: transform → quantize (int8) → export → lower → save, run by
``pipeline``; the artifact is a folder with ``model.pte`` and ``manifest.json``.

* **transform**: the export form by module swaps (``UnfoldedSharedExpert``,
  ``MatmulMeanRMSNorm``, ``MatmulRotary``; the experts as ``SelectedExperts`` with attention as
  ``CacheAttention`` over a cache ``InPlaceCacheWrite`` writes, or with ``experts="fused"``, for
  runtimes without custom kernels, ``FusedExperts`` with the masked attention XNNPACK
  delegates),
  wrapped in ``StatefulDecoder``: the KV cache and conv states are mutable buffers.
* **quantize**: "8da8w" (int8 per-channel weights, int8 dynamic per-token activations) on
  every ``nn.Linear`` except the routers (found by type), whose discrete top-k flips would be
  unbounded errors, as ``DynamicInt8Linear``; torchao's int8 weights with one scale per row on
  every ``nn.Embedding`` (at a 128k vocabulary the table is a quarter of the model); and
  ``SelectedExperts`` → ``SelectedExpertsInt8`` (int8 rows with one scale each, read by the
  kernel). int4 is "8da4w", the same with 4-bit groups (``quantize_int4``). It runs on the
  module, before ``torch.export``: these are module swaps, and torchao quantizes modules.
* **export**: one method, ``forward(tokens [B, T] int64, input_pos [1] int64) → logits
  [B, T, V]`` with a dynamic T in 1 … max_length: prefill is a call at position 0 (it also
  resets the conv states), decoding is a call with T = 1 at the next position. This is the
  contract of ExecuTorch's LLM runner (``TextLLMRunner``, the C++ runner of its phone apps),
  which also reads the constant methods ``runner_metadata`` builds.
* **lower**: ``to_edge_transform_and_lower`` with the XNNPACK partitioner (the experts' custom
  operator stays outside the delegates and runs BiBo's kernel library, as attention over the
  cache does), then
  ``to_executorch``, whose quant fusion turns the embedding's dequantize + lookup into
  ExecuTorch's ``quantized_decomposed::embedding_byte`` (or ``embedding_4bit``) kernel. What
  was delegated and what stays as portable kernels is counted.

The artifact metadata (config, maximum length, batch size, precision) travels inside the
program as a constant method (``bibo_metadata``, UTF-8 JSON as uint8): a ``.pte`` describes
itself, to our runtime and to ExecuTorch's runner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import (EdgeCompileConfig, EdgeProgramManager, ExecutorchBackendConfig,
                             to_edge_transform_and_lower)
from executorch.exir.dialects.edge._ops import EdgeOpOverload
from executorch.exir.lowered_backend_module import get_lowered_backend_modules
from torch import nn
from torch._ops import OpOverload
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerAxis, PerGroup

from ..artifacts import (EXPERT_MODES, INT4_GROUP_SIZE, INTEGER_PRECISIONS, PTE_FILE,
                         ArtifactMetadata, check_group_size)
from ..kernels.library import load_kernels
from ..model import BiBoForCausalLM
from ..model.attention import GroupedAttention
from ..model.layers import CacheWrite, RMSNorm, Rotary
from ..model.moe import MLPExperts, SharedConvExpert
from ..runtimes.executorch import METADATA_METHOD
from .decoders import StatefulDecoder
from .pipeline import ExportSettings, Recipe, Stage, run_export
from .transforms import (CacheAttention, DynamicInt4Linear, DynamicInt8Linear, FusedExperts,
                         InPlaceCacheWrite, MatmulMeanRMSNorm, MatmulRotary, SelectedExperts,
                         SelectedExpertsInt4, SelectedExpertsInt8, UnfoldedSharedExpert,
                         export_form, router_names, swap_modules)

TABLE_QUANTIZATION = {
    8: "; embedding int8 per row (embedding_byte)",
    4: "; embedding int4 with an fp32 scale per group of {group} (embedding_4bit)"}
QUANTIZATION = {
    "int8": "8da8w (int8 per-channel weights, int8 dynamic per-token activations)",
    "int4": ("8da4w (int4 weights with a bf16 scale per group of {group} input weights, int8 "
             "dynamic per-token activations)")}
SELECTED_QUANTIZATION = {
    "int8": "; routed experts int8 per row, activations int8 per token (bibo::moe_experts_int8)",
    "int4": ("; routed experts int4, two to a byte, a scale per group of {group}, activations "
             "int8 per token (bibo::moe_experts_int4)")}
EXPERT_MODULES = (FusedExperts, SelectedExperts, SelectedExpertsInt8, SelectedExpertsInt4)


@dataclass
class ProgramBuild:
    """The recipe's state: the decoder module, then its exported and lowered programs."""

    decoder: StatefulDecoder | None  # released once lowered: the program holds the weights
    quantized: set[str] = field(default_factory=set)  # qualified names of the int8 Linears
    quantized_tables: dict[str, int] = field(default_factory=dict)  # embeddings → their bits
    table_group: int | None = None  # the weights per scale of 4-bit tables
    exported: torch.export.ExportedProgram | None = None
    program: Any = None  # ExecutorchProgramManager
    ops: dict[str, Any] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # decode_weight_bytes


class ExecuTorchRecipe(Recipe):
    format = "executorch"
    versions_of = ("executorch", "torchao")

    def __init__(self, settings: ExportSettings, experts: str = "selected",
                 group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__(settings)
        check_group_size(group_size)
        self.group_size = group_size
        if experts not in EXPERT_MODES:
            raise ValueError(f"experts must be one of {', '.join(EXPERT_MODES)}, got {experts!r}")
        if experts == "selected":
            # Before minutes of lowering: verifying the program needs the kernels.
            load_kernels()
        self.experts = experts

    def shared_stages(self) -> list[Stage]:
        return [("transform", self.transform)]

    def output_stages(self, metadata: ArtifactMetadata) -> list[Stage]:
        first = {"int8": [("quantize", quantize_int8)],
                 "int4": [("quantize", lambda build: quantize_int4(build, self.group_size))],
                 "bf16": [("cast", cast_bf16)]}
        return [*first.get(metadata.precision, []), ("export", self.export),
                ("lower", lambda build: self.lower(build, metadata))]

    def transform(self, model: BiBoForCausalLM) -> ProgramBuild:
        swaps = {SharedConvExpert: UnfoldedSharedExpert, RMSNorm: MatmulMeanRMSNorm,
                 Rotary: MatmulRotary}
        selected = self.experts == "selected"
        if selected:  # programs that need BiBo's kernel library anyway: its attention too
            swaps.update({MLPExperts: SelectedExperts,
                          CacheWrite: lambda _: InPlaceCacheWrite(),
                          GroupedAttention: lambda _: CacheAttention()})
        else:  # only what every ExecuTorch runtime has: XNNPACK and portable kernels
            swaps[MLPExperts] = FusedExperts.of
        decoder = StatefulDecoder(export_form(model, swaps), self.settings.batch_size,
                                  self.settings.max_length)
        return ProgramBuild(decoder.eval())

    def export(self, build: ProgramBuild) -> ProgramBuild:
        max_length, batch_size = self.settings.max_length, build.decoder.batch_size
        example = (torch.zeros(batch_size, min(2, max_length), dtype=torch.long),
                   torch.zeros(1, dtype=torch.long))
        tokens = torch.export.Dim("tokens", min=1, max=max_length)
        build.weight_bytes = decode_weight_bytes(build)
        with torch.no_grad():
            build.exported = torch.export.export(build.decoder, example,
                                                 dynamic_shapes=({1: tokens}, None))
        return build

    def lower(self, build: ProgramBuild, metadata: ArtifactMetadata) -> ProgramBuild:
        """Delegate to XNNPACK what it takes; ``metadata`` becomes a constant method."""
        encoded = torch.tensor(list(metadata.to_json().encode()), dtype=torch.uint8)
        # Without the edge IR verifier, which re-checks every op after each pass: lowering took
        # 2-18 % less time in five paired runs and wrote byte-identical programs (sort-tiny
        # variants, fp32 and int8, 2026-11-27), and our verify stage runs each program against
        # eager before it is published. ExecuTorch's own LLM exporter lowers without it too.
        edge = to_edge_transform_and_lower(
            build.exported, partitioner=[XnnpackPartitioner()],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods={METADATA_METHOD: encoded, **runner_metadata(metadata)})
        build.ops = count_ops(edge)
        # XNNPACK's blobs now hold the weights: release the module and the exported program
        # (3 GB each at 750M parameters, shared) before the final program is built.
        build.exported = build.decoder = None
        # Quant fusion maps quantized embeddings to embedding_byte or embedding_4bit; float
        # programs skip the pass.
        fuse = ExecutorchBackendConfig(
            do_quant_fusion_and_const_prop=metadata.precision in INTEGER_PRECISIONS)
        build.program = edge.to_executorch(fuse)
        return build

    def save(self, build: ProgramBuild, folder: Path, metadata: ArtifactMetadata) -> list[str]:
        with (folder / PTE_FILE).open("wb") as f:
            build.program.write_to_file(f)
        return [PTE_FILE]

    def inspect(self, build: ProgramBuild, folder: Path, precision: str) -> dict[str, Any]:
        facts: dict[str, Any] = {"ops": build.ops, "experts": experts_mode(build.ops),
                                 "decode_weight_bytes_per_token": build.weight_bytes}
        if precision in INTEGER_PRECISIONS:
            selected = facts["experts"] == "selected"
            tables = sorted(set(build.quantized_tables.values()), reverse=True)
            described = QUANTIZATION[precision] + \
                "".join(TABLE_QUANTIZATION[bits] for bits in tables) + "; router float" + \
                (SELECTED_QUANTIZATION[precision] if selected else "")
            facts.update(quantization=described.format(group=self.group_size),
                         quantized_linears=len(build.quantized),
                         quantized_embeddings=len(build.quantized_tables),
                         integer_kernels=build.ops["quantized_linears"])
            if precision == "int4":
                facts["group_size"] = self.group_size
        return facts

    def summary(self, manifest: dict[str, Any]) -> str:
        ops, check = manifest["ops"], manifest["verification"]
        weight_bytes = manifest["decode_weight_bytes_per_token"]
        return (f"[executorch] {manifest['precision']}: {manifest['total_bytes'] / 1e6:.2f} MB; "
                f"XNNPACK {ops['delegate_calls']} delegates ({ops['delegated_ops']} ops, "
                f"{ops['quantized_linears']} quantized linears), {ops['portable_ops']} portable "
                f"ops; "
                f"experts {manifest['experts']}; decode reads "
                f"{weight_bytes['touched'] / 1e6:.2f} MB/token (active minimum "
                f"{weight_bytes['active_minimum'] / 1e6:.2f} MB); vs eager max|Δ| "
                f"{check['max_abs']:.2e}, top-1 {check['top1_agreement']:.1%}, cosine "
                f"{check['cosine']:.5f}, greedy tokens "
                f"{'identical' if check['greedy_match'] else 'differ'}; verified")


def export_executorch(source: str | Path | BiBoForCausalLM, outs: dict[str, str | Path],
                      max_length: int | None = None, batch_size: int = 1,
                      reference: BiBoForCausalLM | None = None, experts: str = "selected",
                      group_size: int = INT4_GROUP_SIZE) -> dict[str, dict[str, Any]]:
    """Export to one folder per precision (``model.pte`` + ``manifest.json``), e.g.
    ``{"int8": "artifacts/executorch/int8"}``. ``max_length`` (default: the model's maximum)
    bounds prompt + generated tokens; the program is built for a fixed ``batch_size``.
    ``experts`` (``EXPERT_MODES``): ``selected`` programs need BiBo's kernel library wherever
    they run, ``fused`` ones only ExecuTorch's own kernels. ``group_size``: int4's weights
    per scale."""
    return run_export(ExecuTorchRecipe, source, outs, max_length, batch_size, reference,
                      experts=experts, group_size=group_size)


def experts_mode(ops: dict[str, Any]) -> str:
    """How a lowered program computes its experts, read from its operators."""
    custom = [op for op in ops["portable_by_op"] if op.startswith("bibo.moe_experts")]
    return "selected" if custom else "fused"


def runner_metadata(metadata: ArtifactMetadata) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (executorch 1.4.1,
    ``extension/llm/runner/llm_runner_helper.cpp``). Its maximum sequence length (the longest
    prefill call) equals the context length: a smaller one would make the runner treat the
    cache as a sliding window. Models trained with a tokenizer stop at its end-of-text token,
    which also serves as BOS (the runner prepends none by default)."""
    methods: dict[str, Any] = {"get_max_seq_len": metadata.max_length,
                               "get_max_context_len": metadata.max_length,
                               "get_vocab_size": metadata.config.vocab_size,
                               "use_kv_cache": True, "enable_dynamic_shape": True}
    if metadata.eos_id is not None:
        methods.update(get_bos_id=metadata.eos_id, get_eos_ids=[metadata.eos_id])
    return methods


# ------------------------------------------------------------------------------ quantize
def quantize_int8(build: ProgramBuild) -> ProgramBuild:
    """8da8w (int8 per-channel weights, int8 dynamic per-token activations) on every Linear but
    the routers (kept float, docs/export.md); int8 embedding tables with one scale per row; the
    selected-experts operator's weights as int8 rows."""
    return quantize_integer(build, SelectedExpertsInt8, DynamicInt8Linear, None)


def quantize_int4(build: ProgramBuild, group_size: int) -> ProgramBuild:
    """8da4w (int4 weights with a scale per ``group_size`` input weights, int8 dynamic
    per-token activations) on every Linear but the routers, the output projection included, as
    ExecuTorch's LLM recipe does; the selected-experts operator's weights int4 in the same
    groups; embedding tables int4 in the same groups where their width is a multiple of the
    group (``embedding_4bit``), int8 per row where not."""
    return quantize_integer(build, lambda experts: SelectedExpertsInt4(experts, group_size),
                            lambda linear: DynamicInt4Linear(linear, group_size), group_size)


def quantize_integer(build: ProgramBuild, experts_form: Callable[[SelectedExperts], nn.Module],
                     linear_form: Callable[[nn.Linear], nn.Module],
                     table_group: int | None) -> ProgramBuild:
    """Quantize ``build``'s decoder: the experts and Linears (routers excepted) by the given
    forms, the embedding tables int4 in groups of ``table_group`` where it divides their width
    and int8 per row otherwise (torchao's weight-only forms, which quant fusion turns into
    ExecuTorch's ``embedding_4bit`` and ``embedding_byte``)."""
    swap_modules(build.decoder, {SelectedExperts: experts_form})
    routers = router_names(build.decoder)
    modules = dict(build.decoder.named_modules())
    build.quantized = {name for name, module in modules.items()
                       if isinstance(module, nn.Linear) and name not in routers}
    build.table_group = table_group
    build.quantized_tables = {
        name: 4 if table_group and module.embedding_dim % table_group == 0 else 8
        for name, module in modules.items() if isinstance(module, nn.Embedding)}
    for name in build.quantized:
        parent, _, child = name.rpartition(".")
        setattr(build.decoder.get_submodule(parent), child, linear_form(modules[name]))
    forms = {8: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))}
    if table_group:
        forms[4] = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(table_group))
    for bits, form in forms.items():
        tables = {name for name, table_bits in build.quantized_tables.items()
                  if table_bits == bits}
        quantize_(build.decoder, form, filter_fn=lambda module, name: name in tables)
    return build


def cast_bf16(build: ProgramBuild) -> ProgramBuild:
    """Weights, cache and activations in bfloat16: half the fp32 program. The logits leave
    the model as float32 (its lm_head output is cast), so runtimes see one output type. The
    experts' kernel is float32/int8 only, so bf16 programs fuse all experts."""
    swap_modules(build.decoder, {SelectedExperts: FusedExperts.of})
    build.decoder.to(torch.bfloat16)
    return build


# ------------------------------------------------------------------------------ decode cost
def decode_weight_bytes(build: ProgramBuild) -> dict[str, int]:
    """Weight bytes one decoded token reads: this program vs the active-parameter minimum.

    The minimum reads k routed MLP experts per MoE layer (a token that picks parameter-free
    experts reads fewer). ``FusedExperts`` reads all of them (XNNPACK cannot delegate linears
    inside ``torch.cond``, docs/export.md); the selected-experts kernel reads the chosen ones, at
    most the minimum (its own counter measures what it read: ``kernels.library``). Both read
    one embedding row (``table_row_bytes``). int4 Linears: half a byte per weight and XNNPACK's
    bf16 group scales; every other tensor at its own element size (int8 Linears hold int8
    weights and fp32 scales).
    """
    model = build.decoder.model
    config, prefix = model.config, "model."
    total = expert = 0
    expert_modules = {name for name, module in model.named_modules()
                      if isinstance(module, EXPERT_MODULES)}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            total += table_row_bytes(module, build.quantized_tables.get(prefix + name),
                                     build.table_group)
            continue
        for param in module.parameters(recurse=False):
            size = stored_bytes(module, param)
            total += size
            # FusedExperts holds its weights in child Linears, the selected forms directly.
            if name in expert_modules or name.rpartition(".")[0] in expert_modules:
                expert += size
    # A token reads `chosen` of each MoE layer's equally sized experts (none without MoE layers).
    chosen = min(config.num_experts_per_tok, config.num_mlp_experts)
    minimum = total - expert + round(expert * chosen / config.num_mlp_experts)
    fused = any(isinstance(module, FusedExperts) for module in model.modules())
    return {"touched": total if fused else minimum, "active_minimum": minimum,
            "outside_routed_experts": total - expert}


def table_row_bytes(table: nn.Embedding, bits: int | None, group: int | None) -> int:
    """The bytes of one row of an embedding table as the program stores it: int8 rows
    (``embedding_byte``) a byte per weight and an fp32 scale, int4 rows (``embedding_4bit``)
    half a byte per weight and an fp32 scale per group, float rows their element size."""
    if bits == 8:
        return table.embedding_dim + 4
    if bits == 4:
        return table.embedding_dim // 2 + 4 * (table.embedding_dim // group)
    return table.embedding_dim * table.weight.element_size()


def stored_bytes(module: nn.Module, param: nn.Parameter) -> int:
    """The bytes a program holds for one of ``module``'s own parameters: XNNPACK packs an int4
    Linear's weights (int8 until then) two to a byte and keeps its group scales in bf16."""
    if isinstance(module, DynamicInt4Linear) and param is module.weight:
        return (param.numel() + 1) // 2
    if isinstance(module, DynamicInt4Linear) and param is module.scale:
        return param.numel() * 2
    return param.numel() * param.element_size()


def op_name(node: torch.fx.Node) -> str:
    return target_name(node.target)


def target_name(target: Any) -> str:
    """``namespace.op[.overload]``: an edge operator's name, or an ATen/custom one's."""
    name = str(target) if isinstance(target, OpOverload) else getattr(target, "__name__",
                                                                       str(target))
    return name.removesuffix(".default")


def kernel_ops(graph: torch.fx.Graph) -> Counter:
    """Operator calls of a graph, by name (not getitem, not symbolic-int arithmetic). An
    operator that writes its input in place (``bibo::update_cache``) is wrapped in
    ``auto_functionalized_v2`` here, until ``to_executorch`` writes in place again: it counts
    as itself."""
    ops: Counter = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.auto_functionalized_v2:
            ops[target_name(node.args[0])] += 1
        elif isinstance(node.target, (EdgeOpOverload, OpOverload)):
            ops[op_name(node)] += 1
    return ops


def count_ops(edge_program: EdgeProgramManager) -> dict[str, Any]:
    """What runs where: ops inside XNNPACK delegates vs ops left to portable kernels.

    A linear counts as quantized when its weight comes from a dequantize op (8da8w's pattern).
    """
    graph_module = edge_program.exported_program().graph_module
    lowered = get_lowered_backend_modules(graph_module)
    portable, delegated = kernel_ops(graph_module.graph), Counter()
    quantized_linears = float_linears = 0
    for module in lowered:
        delegated += kernel_ops(module.original_module.graph)
        for node in module.original_module.graph.nodes:
            if node.op == "call_function" and op_name(node) == "aten.linear":
                if "dequantize" in op_name(node.args[1]):
                    quantized_linears += 1
                else:
                    float_linears += 1
    return {"delegate_calls": len(lowered),
            "delegated_ops": sum(delegated.values()), "portable_ops": sum(portable.values()),
            "quantized_linears": quantized_linears, "float_linears": float_linears,
            "delegated_by_op": dict(sorted(delegated.items())),
            "portable_by_op": dict(sorted(portable.items()))}
