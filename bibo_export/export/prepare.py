"""The "prepare" stage shared by every exporter: an export-form copy of a trained BiBo.

What changes from the training form, and why:

* **Experts as ``nn.Linear``.** int8 recipes (ORT ``quantize_dynamic`` on MatMul, torchao
  8da8w) quantize 2-D Linear weights only, never the stacked [E, m, h] tensors. Two layouts:
  ``"skip-unselected"`` (ONNX) gives each expert its own three Linears and runs it under
  ``torch.cond`` on "did any token choose it", so a decode step touches only the chosen
  experts' weights (ONNX exports ``cond`` as ``If``); ``"fused"`` (ExecuTorch, whose XNNPACK
  delegate cannot reach into ``cond``, DESIGN §6) computes every expert at once with three wide
  Linears instead of 3·E small ones (sort-tiny fp32 lowering: 183 s instead of 240 s).
* **No capacity.** Inference computes every selected expert; dropping would make a token's
  output depend on the rest of the batch. Parity is measured against eager with the same rule.
* **Flat signatures.** ``FlatCacheDecoder`` takes and returns the cache as a flat tuple of
  tensors (ONNX inputs/outputs); ``StatefulDecoder`` keeps it in buffers that the program
  mutates (ExecuTorch's mutable buffers).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import BiBoForCausalLM
from ..model.bibo import LayerCache
from ..model.layers import SwiGLU
from ..model.moe import MLPExperts, MoE


ExpertLayout = Literal["skip-unselected", "fused"]


def expert_linears(experts: MLPExperts) -> nn.ModuleList:
    """The stacked expert weights as one SwiGLU (three nn.Linear) per expert."""
    modules = nn.ModuleList()
    for gate, up, down in zip(experts.gate_proj, experts.up_proj, experts.down_proj):
        ffn = SwiGLU(gate.shape[1], gate.shape[0])
        with torch.no_grad():
            ffn.gate_proj.weight.copy_(gate)
            ffn.up_proj.weight.copy_(up)
            ffn.down_proj.weight.copy_(down)
        modules.append(ffn)
    return modules


class FusedExperts(nn.Module):
    """All E experts as three Linears: gate and up stack the experts' rows ([E·m, h]), down
    joins their columns ([h, E·m]). Scaling expert e's block of the activation by its gate
    weight before the down projection makes Σ_e g_e · down_e(act_e) a single matmul."""

    def __init__(self, experts: MLPExperts) -> None:
        super().__init__()
        num_experts, self.width, hidden = experts.gate_proj.shape
        self.gate_proj = nn.Linear(hidden, num_experts * self.width, bias=False)
        self.up_proj = nn.Linear(hidden, num_experts * self.width, bias=False)
        self.down_proj = nn.Linear(num_experts * self.width, hidden, bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(experts.gate_proj.reshape(-1, hidden))
            self.up_proj.weight.copy_(experts.up_proj.reshape(-1, hidden))
            self.down_proj.weight.copy_(experts.down_proj.permute(1, 0, 2).reshape(hidden, -1))

    def forward(self, x: Tensor, gates: Tensor) -> Tensor:
        act = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [N, E·m]
        act = act.unflatten(-1, (-1, self.width)) * gates[..., None].to(x.dtype)
        return self.down_proj(act.flatten(-2))


class ExportMoE(MoE):
    """MoE whose MLP experts are Linear modules (``layout``), computed exactly, never dropped."""

    def __init__(self, moe: MoE, layout: ExpertLayout) -> None:
        super().__init__(dataclasses.replace(moe.config, capacity_factor=None))
        self.load_state_dict(moe.state_dict())
        self.layout = layout
        self.expert_ffns = (FusedExperts(moe.experts) if layout == "fused"
                            else expert_linears(moe.experts))
        del self.experts

    def _mlp_experts(self, flat: Tensor, indices: Tensor, weights: Tensor,
                     gates: Tensor) -> tuple[Tensor, Tensor]:
        no_aux = flat.new_zeros((), dtype=torch.float32)
        if self.layout == "fused":
            return self.expert_ffns(flat, gates[:, :self.config.num_mlp_experts]), no_aux
        out = torch.zeros_like(flat)
        for e, ffn in enumerate(self.expert_ffns):
            gate = gates[:, e, None].to(flat.dtype)
            out = out + torch.cond(gate.ne(0).any(), _weighted_expert(ffn), _no_expert,
                                   (flat, gate))
        return out, no_aux


def _weighted_expert(ffn: nn.Module):
    def run(x: Tensor, gate: Tensor) -> Tensor:
        return ffn(x) * gate
    return run


def _no_expert(x: Tensor, gate: Tensor) -> Tensor:
    return torch.zeros_like(x)


def prepare_for_export(model: BiBoForCausalLM, layout: ExpertLayout) -> BiBoForCausalLM:
    """An eval-mode copy of ``model`` in export form (the input model is left untouched)."""
    model = copy.deepcopy(model).eval()
    model.config = dataclasses.replace(model.config, capacity_factor=None)
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp = ExportMoE(layer.mlp, layout)
    return model


def inference_copy(model: BiBoForCausalLM) -> BiBoForCausalLM:
    """The eager reference for parity: same weights, eval mode, no capacity (as exported)."""
    reference = copy.deepcopy(model).eval()
    reference.config = dataclasses.replace(model.config, capacity_factor=None)
    for moe in reference.moe_layers:
        moe.config = reference.config
    return reference


# ------------------------------------------------------------------------------ cache layouts
def cache_names(model: BiBoForCausalLM) -> list[str]:
    """Stable flat names of the cache tensors: ``layers.{i}.{key|value|shared_conv|router_conv}``."""
    layout = model.new_cache(1, 1)
    return [f"layers.{i}.{name}" for i, entry in enumerate(layout) for name in sorted(entry)]


def flatten_cache(cache: list[LayerCache]) -> tuple[Tensor, ...]:
    return tuple(entry[name] for entry in cache for name in sorted(entry))


def unflatten_cache(model: BiBoForCausalLM, tensors: tuple[Tensor, ...]) -> list[LayerCache]:
    layout = model.new_cache(1, 1)
    it = iter(tensors)
    return [{name: next(it) for name in sorted(entry)} for entry in layout]


class FlatCacheDecoder(nn.Module):
    """(input_ids [B, T], start_pos [] int64, *cache) → (logits [B, T, V], *new cache).

    One graph serves prefill (T = prompt length, start_pos 0) and decode (T = 1).
    """

    def __init__(self, model: BiBoForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, start_pos: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids, cache=unflatten_cache(self.model, cache), start_pos=start_pos)
        return (out.logits, *flatten_cache(out.cache))


class StatefulDecoder(nn.Module):
    """(input_ids [B, T], start_pos [] int64) → logits; the cache lives in mutable buffers.

    Calling with start_pos 0 begins a new sequence: cached positions ≥ start_pos are masked by
    causality and overwritten as the sequence grows, and the conv states are zeroed.
    ``torch.export`` (torch 2.13) keeps the ``copy_`` calls in its non-functional IR, so
    ``graph_signature.buffers_to_mutate`` is empty until ``run_decompositions()`` (which
    ``to_edge`` runs) functionalizes them into buffer mutations of the program.
    """

    def __init__(self, model: BiBoForCausalLM, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.batch_size, self.max_length = batch_size, max_length
        self.names = [name.replace(".", "_") for name in cache_names(model)]
        for name, tensor in zip(self.names, flatten_cache(model.new_cache(batch_size, max_length))):
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, input_ids: Tensor, start_pos: Tensor) -> Tensor:
        fresh = (start_pos > 0).to(torch.float32)  # conv states restart with each sequence
        cache = []
        for name in self.names:
            tensor = getattr(self, name)
            cache.append(tensor * fresh if name.endswith("conv") else tensor)
        out = self.model(input_ids, cache=unflatten_cache(self.model, tuple(cache)),
                         start_pos=start_pos)
        for name, tensor in zip(self.names, flatten_cache(out.cache)):
            getattr(self, name).copy_(tensor)
        return out.logits
