"""Export a BiBo checkpoint to an ExecuTorch program (``.pte``) lowered to XNNPACK.

Stages: prepare → quantize (``--int8``) → export → lower → save → verify.

* **prepare**: the shared export form (per-expert ``nn.Linear``, no capacity), the shared
  expert's causal conv rewritten as one Linear over the last K inputs (so 8da8w reaches it), and
  ``StatefulDecoder``: the KV cache and conv states are mutable buffers of the program.
* **quantize**: torchao "8da8w" (int8 per-channel weights, int8 dynamic per-token activations)
  on every ``nn.Linear`` except the router, whose discrete top-k flips would be unbounded errors.
  It runs on the eager module because torchao quantizes modules, before ``torch.export``.
* **export**: one method, ``forward(input_ids [B, T], start_pos [] int64) → logits [B, T, V]``
  with a dynamic T in 1 … max_length: prefill is a call at start_pos 0 (it also resets the conv
  states), decoding is a call with T = 1 at the next position.
* **lower**: ``to_edge_transform_and_lower`` with the XNNPACK partitioner, then
  ``to_executorch``. What was delegated and what stays as portable kernels is counted.
* **save**: the ``.pte`` is written atomically; ``manifest.json`` beside it lists every program
  of the folder (``model_fp32.pte``, ``model_int8.pte``, ...) with sizes, hashes and each
  program's own record (precision, op counts, verification).
* **verify**: the saved file, run by the ExecuTorch runtime, against eager PyTorch.

The config, the maximum length and the batch size travel inside the program as a constant
method (``bibo_metadata``, UTF-8 JSON as uint8), so a ``.pte`` is self-describing.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import BiBoForCausalLM
from ..model.moe import SharedConvExpert
from ..parity import BARS, compare_generation, compare_logits
from ..io import atomic_path
from .manifest import MANIFEST_FILE, write_manifest
from .prepare import StatefulDecoder, prepare_for_export
from .stages import stage

EXPORTER = "executorch"
METADATA_METHOD = "bibo_metadata"
VERIFY_SEED = 0


# ------------------------------------------------------------------------------ prepare
class UnfoldedSharedExpert(nn.Module):
    """The shared expert with its causal Conv1d as one Linear over [x_{t-K+1}; …; x_t].

    Same function as ``SharedConvExpert`` (a convolution is a linear map of its window), but
    the conv weight becomes a 2-D Linear weight, which int8 recipes quantize.
    """

    def __init__(self, shared: SharedConvExpert) -> None:
        super().__init__()
        width, hidden, kernel = shared.conv.weight.shape
        self.kernel_size = kernel
        self.conv = nn.Linear(kernel * hidden, width, bias=False)
        with torch.no_grad():  # window feature j*h + c holds input channel c at offset j
            self.conv.weight.copy_(shared.conv.weight.permute(0, 2, 1).reshape(width, -1))
        self.up_proj = shared.up_proj
        self.down_proj = shared.down_proj

    def forward(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        history = self.kernel_size - 1
        if state is None:
            state = u.new_zeros(u.shape[0], history, u.shape[2])
        padded = torch.cat([state.to(u.dtype), u], dim=1)
        T = u.shape[1]
        windows = torch.cat([padded[:, j:j + T] for j in range(self.kernel_size)], dim=-1)
        out = self.down_proj(F.silu(self.conv(windows)) * self.up_proj(u))
        return out, padded[:, padded.shape[1] - history:]


def prepare(model: BiBoForCausalLM, batch_size: int, max_length: int) -> StatefulDecoder:
    """The export form of ``model`` as a stateful decoder (the input model is untouched)."""
    model = prepare_for_export(model, "fused")
    for moe in model.moe_layers:
        moe.shared_expert = UnfoldedSharedExpert(moe.shared_expert)
    return StatefulDecoder(model, batch_size, max_length).eval()


# ------------------------------------------------------------------------------ quantize
def is_quantized_linear(module: nn.Module, fqn: str) -> bool:
    """8da8w targets: every Linear but the router (kept float, DESIGN §6)."""
    return isinstance(module, nn.Linear) and not fqn.endswith("router")


def quantize_8da8w(decoder: StatefulDecoder) -> int:
    """int8 per-channel weights, int8 dynamic per-token activations; returns how many Linears."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    targets = sum(is_quantized_linear(m, name) for name, m in decoder.named_modules())
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                   weight_granularity=PerAxis(0))
    quantize_(decoder, config, filter_fn=is_quantized_linear)
    return targets


# ------------------------------------------------------------------------------ export, lower
def export_program(decoder: StatefulDecoder, max_length: int) -> torch.export.ExportedProgram:
    batch_size = decoder.batch_size
    example = (torch.zeros(batch_size, min(2, max_length), dtype=torch.long),
               torch.tensor(0, dtype=torch.long))
    tokens = torch.export.Dim("tokens", min=1, max=max_length)
    with torch.no_grad():
        return torch.export.export(decoder, example, dynamic_shapes=({1: tokens}, None))


def lower(program: torch.export.ExportedProgram, metadata: dict[str, Any]):
    """Edge program delegated to XNNPACK where it can be; returns the edge program manager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    encoded = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       constant_methods={METADATA_METHOD: encoded})


# ------------------------------------------------------------------------------ decode cost
def decode_weight_bytes(decoder: StatefulDecoder, int8: bool) -> dict[str, int]:
    """Weight bytes one decoded token reads: this program vs the active-parameter minimum.

    The program runs every routed MLP expert on every token (XNNPACK cannot delegate linears
    inside ``torch.cond``; DESIGN §6), so it touches all expert weights; the minimum reads only
    k of them per MoE layer. Both read one embedding row. int8 Linears: 1 byte per weight plus
    an fp32 scale per output channel; everything else fp32.
    """
    config = decoder.model.config
    touched = expert = 0
    for name, module in decoder.model.named_modules():
        if isinstance(module, nn.Embedding):
            touched += module.embedding_dim * 4
            continue
        for param in module.parameters(recurse=False):
            if int8 and is_quantized_linear(module, name):
                size = param.numel() + param.shape[0] * 4
            else:
                size = param.numel() * param.element_size()
            touched += size
            expert += size if ".expert_ffns." in name else 0
    per_expert = expert / (len(decoder.model.moe_layers) * config.num_mlp_experts)
    skipped = config.num_mlp_experts - min(config.num_experts_per_tok, config.num_mlp_experts)
    minimum = touched - round(len(decoder.model.moe_layers) * skipped * per_expert)
    return {"touched": touched, "active_minimum": minimum}


def op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).removesuffix(".default")


def kernel_ops(graph: torch.fx.Graph) -> Counter:
    """Operator calls of a graph, by name (not getitem, not symbolic-int arithmetic)."""
    from executorch.exir.dialects.edge._ops import EdgeOpOverload
    from torch._ops import OpOverload

    return Counter(op_name(node) for node in graph.nodes if node.op == "call_function"
                   and isinstance(node.target, (EdgeOpOverload, OpOverload)))


def count_ops(edge_program) -> dict[str, Any]:  # noqa: ANN001 - an EdgeProgramManager
    """What runs where: ops inside XNNPACK delegates vs ops left to portable kernels.

    A linear counts as quantized when its weight comes from a dequantize op (8da8w's pattern).
    """
    from executorch.exir.lowered_backend_module import get_lowered_backend_modules

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


# ------------------------------------------------------------------------------ save, verify
def save_program(executorch_program, out: Path) -> None:
    with atomic_path(out) as tmp:
        with tmp.open("wb") as f:
            executorch_program.write_to_file(f)


def verify(path: Path, model: BiBoForCausalLM, int8: bool) -> dict[str, Any]:
    """The saved program against eager on a seeded random prompt: logits and greedy tokens."""
    from ..runtimes.eager import EagerRuntime
    from ..runtimes.executorch import ExecuTorchRuntime

    candidate = ExecuTorchRuntime.from_file(path)
    reference = EagerRuntime(model, max_length=candidate.max_length)
    prompt_length = max(1, min(16, candidate.max_length // 2))
    new_tokens = min(16, candidate.max_length - prompt_length)
    rng = np.random.default_rng(VERIFY_SEED)
    prompt = rng.integers(0, model.config.vocab_size, (candidate.batch_size, prompt_length))
    result = compare_logits(candidate.logits(prompt), reference.logits(prompt))
    result.update(compare_generation(candidate, reference, prompt, new_tokens))
    if int8:  # on random weights these are informative only; trained-model bars: DESIGN §7
        bars = BARS["int8"]
        result["passed"] = (result["top1_agreement"] >= bars["top1_agreement"]
                            and result["cosine"] >= bars["cosine"])
    else:
        result["passed"] = (result["max_abs"] <= BARS["executorch-fp32"]["max_abs"]
                            and result["greedy_match"])
    return result


def update_manifest(directory: Path, name: str, record: dict[str, Any]) -> Path:
    """Add (or replace) one program's record in the folder's shared ``manifest.json``.

    Exports of several programs into one folder may run at once (make export-executorch
    runs fp32 and int8 side by side): the read-modify-write holds a lock on the folder.
    """
    path = directory / MANIFEST_FILE
    folder = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        programs: dict[str, Any] = {}
        if path.is_file():
            try:
                programs = json.loads(path.read_text()).get("programs", {})
            except json.JSONDecodeError:
                programs = {}
        programs = {k: v for k, v in programs.items() if (directory / k).is_file()}
        programs[name] = record
        return write_manifest(directory, sorted(programs), format="executorch",
                              backend="xnnpack", programs=programs)
    finally:
        os.close(folder)  # releases the lock


# ------------------------------------------------------------------------------ the export
def check_arguments(checkpoint: Path, out: Path, max_length: int | None,
                    batch_size: int) -> None:
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "model.safetensors").exists():
        raise ValueError(f"{checkpoint} is not a checkpoint folder (config.json + "
                         "model.safetensors)")
    if out.suffix != ".pte":
        raise ValueError(f"the output must be a .pte file path, got {out}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def export_executorch(checkpoint: str | Path, out: str | Path, int8: bool = False,
                      max_length: int | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Export ``checkpoint`` to the ExecuTorch program ``out`` (``.pte``) and record it in
    ``manifest.json`` beside it. Returns that program's manifest record.

    ``max_length`` (default: the config's max_position_embeddings) bounds prompt + generated
    tokens; the program is built for a fixed ``batch_size``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    check_arguments(checkpoint, out, max_length, batch_size)
    precision = "int8" if int8 else "fp32"
    with stage(EXPORTER, "prepare"):
        model = BiBoForCausalLM.from_pretrained(checkpoint)
        max_length = max_length or model.config.max_position_embeddings
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's "
                             f"max_position_embeddings {model.config.max_position_embeddings}")
        decoder = prepare(model, batch_size, max_length)
        weight_bytes = decode_weight_bytes(decoder, int8)
    quantized = 0
    if int8:
        with stage(EXPORTER, "quantize"):
            quantized = quantize_8da8w(decoder)
    with stage(EXPORTER, "export"):
        program = export_program(decoder, max_length)
    with stage(EXPORTER, "lower"):
        metadata = {"config": model.config.to_dict(), "max_length": max_length,
                    "batch_size": batch_size, "precision": precision}
        edge = lower(program, metadata)
        ops = count_ops(edge)
        executorch_program = edge.to_executorch()
    with stage(EXPORTER, "save"):
        save_program(executorch_program, out)
    with stage(EXPORTER, "verify"):
        verification = verify(out, model, int8)
    record = {"precision": precision, "checkpoint": str(checkpoint), "max_length": max_length,
              "batch_size": batch_size, "quantized_linears": quantized,
              "quantization": "8da8w (int8 per-channel weights, int8 dynamic per-token "
                              "activations); router float" if int8 else None,
              "bytes": out.stat().st_size, "decode_weight_bytes_per_token": weight_bytes,
              "ops": ops, "verification": verification,
              "versions": {name: version(name) for name in ("torch", "executorch", "torchao")}}
    update_manifest(out.parent, out.name, record)
    print(summary(out.name, record), flush=True)
    return record


def summary(name: str, record: dict[str, Any]) -> str:
    """The parity summary of one exported program, as printed at the end of an export."""
    ops, check = record["ops"], record["verification"]
    weight_bytes = record["decode_weight_bytes_per_token"]
    return (f"[{EXPORTER}] {name}: {record['precision']}, {record['bytes'] / 1e6:.2f} MB; "
            f"XNNPACK {ops['delegate_calls']} delegates ({ops['delegated_ops']} ops, "
            f"{ops['quantized_linears']} int8 linears), {ops['portable_ops']} portable ops; "
            f"decode reads {weight_bytes['touched'] / 1e6:.2f} MB/token (active minimum "
            f"{weight_bytes['active_minimum'] / 1e6:.2f} MB)\n"
            f"[{EXPORTER}] vs eager: max|Δ| {check['max_abs']:.2e}, top-1 "
            f"{check['top1_agreement']:.1%}, cosine {check['cosine']:.5f}, greedy tokens "
            f"{'identical' if check['greedy_match'] else 'differ'}; DESIGN §7 bars "
            f"{'met' if check['passed'] else 'NOT met'}"
            f"{' (int8 bars assume a trained model)' if record['precision'] == 'int8' else ''}")
