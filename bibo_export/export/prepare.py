"""The "prepare" stage shared by every exporter: an export-form copy of a trained BiBo.

What changes from the training form, and why:

* **Per-expert ``nn.Linear`` experts.** int8 recipes (ORT ``quantize_dynamic`` on MatMul,
  torchao 8da8w) quantize 2-D Linear weights only, never the stacked [E, m, h] tensors.
* **No capacity.** Inference computes every selected expert; dropping would make a token's
  output depend on the rest of the batch. Parity is measured against eager with the same rule.
* **Optional skipping of unselected experts** (``skip_unselected``): each expert runs under
  ``torch.cond`` on "did any token choose it", so a decode step touches only the chosen experts'
  weights. ONNX exports ``cond`` as ``If``.
* **Flat signatures.** ``FlatCacheDecoder`` takes and returns the cache as a flat tuple of
  tensors (ONNX inputs/outputs); ``StatefulDecoder`` keeps it in buffers that the program
  mutates (ExecuTorch's mutable buffers).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..model import BiBoForCausalLM
from ..model.bibo import LayerCache
from ..model.layers import SwiGLU
from ..model.moe import MLPExperts, MoE


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


class ExportMoE(MoE):
    """MoE whose MLP experts are separate Linear modules, computed per expert, never dropped."""

    def __init__(self, moe: MoE, skip_unselected: bool) -> None:
        super().__init__(dataclasses.replace(moe.config, capacity_factor=None))
        self.load_state_dict(moe.state_dict())
        self.expert_ffns = expert_linears(moe.experts)
        del self.experts
        self.skip_unselected = skip_unselected

    def _mlp_experts(self, flat: Tensor, indices: Tensor, weights: Tensor,
                     gates: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.zeros_like(flat)
        for e, ffn in enumerate(self.expert_ffns):
            gate = gates[:, e, None].to(flat.dtype)
            if self.skip_unselected:
                out = out + torch.cond(gate.ne(0).any(), _weighted_expert(ffn), _no_expert,
                                       (flat, gate))
            else:
                out = out + ffn(flat) * gate
        return out, flat.new_zeros((), dtype=torch.float32)


def _weighted_expert(ffn: nn.Module):
    def run(x: Tensor, gate: Tensor) -> Tensor:
        return ffn(x) * gate
    return run


def _no_expert(x: Tensor, gate: Tensor) -> Tensor:
    return torch.zeros_like(x)


def prepare_for_export(model: BiBoForCausalLM, skip_unselected: bool = False) -> BiBoForCausalLM:
    """An eval-mode copy of ``model`` in export form (the input model is left untouched)."""
    model = copy.deepcopy(model).eval()
    model.config = dataclasses.replace(model.config, capacity_factor=None)
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp = ExportMoE(layer.mlp, skip_unselected)
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
