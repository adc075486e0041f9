"""Export-time model rewrites, as module swaps by type built from the modules' public weights.

Each replacement computes the same function as the module it replaces, in a form an exporter
handles better:

* ``MLPExperts`` (stacked [E, out, in] weights, capacity dispatch) → one of
  * ``SkipUnselectedExperts`` (ONNX): one SwiGLU of three ``nn.Linear`` per expert, each under
    ``torch.cond`` on "did any token choose it", exported as an ``If``, so a decode step reads
    only the chosen experts;
  * ``SelectedExperts`` (ExecuTorch): one call of the custom operator ``bibo::moe_experts``
    with the routing as inputs, whose C++ kernel runs only the chosen experts;
    ``SelectedExpertsInt8`` is its int8 form (int8 rows, one scale each),
    ``SelectedExpertsInt4`` its int4 form (two weights a byte, one scale per group);
  * ``FusedExperts`` (ExecuTorch without the kernel library, and bf16): three wide
    ``nn.Linear`` for all experts, which XNNPACK delegates (it cannot delegate inside
    ``cond``, docs/export.md) at the price of reading every expert.
  int8 recipes quantize 2-D ``nn.Linear`` weights. All of them compute every selected expert:
  no capacity drops at inference.
* ``SharedConvExpert`` → ``UnfoldedSharedExpert`` (both exporters): the causal Conv1d as one
  ``nn.Linear`` over the window of the last K inputs, which 8da8w and ORT's MatMul
  quantization handle (ORT's ``ConvInteger`` took 150 µs per one-token call at `bench`).
* ``nn.Linear`` → ``DynamicInt8Linear`` (ExecuTorch int8, every Linear but the routers):
  "8da8w" in the ``quantized_decomposed`` operators that XNNPACK runs as int8 GEMMs;
  ``DynamicInt4Linear`` (int4): "8da4w", group-wise int4 weights XNNPACK runs as such.

* ``RMSNorm`` → ``MatmulMeanRMSNorm`` (ExecuTorch): the mean of squares as a product with a
  constant row of ones, which XNNPACK delegates; its ``mean.dim`` takes only 4-D inputs, so
  every norm stayed a portable operator that split the delegates around it.
* ``CacheWrite`` → ``ScatterCacheWrite`` (ONNX): the cache write as ScatterElements along the
  slot dimension; ``index_copy`` there exports as a ScatterND between two transposes of the
  whole cache, three copies of it per layer and decode step (`bench` int8 at max length 160:
  decode 1.18× faster without them, 2026-11-26).
* ``GroupedAttention`` → ``SdpaGroupedAttention`` (ONNX): ``scaled_dot_product_attention``
  with grouped KV heads, which the exporter writes at opset 23 as one ``Attention`` node where
  the grouped matmuls were a dozen nodes per layer (at opset 23 ORT also fuses the rotate-half
  RoPE into one ``RotaryEmbedding``: `bench` int8, 703 → 541 nodes per decode step).
* ``CacheWrite`` → ``InPlaceCacheWrite`` and ``GroupedAttention`` → ``CacheAttention``
  (ExecuTorch): the cache written in place and attention over it by the kernels of BiBo's
  library (``bibo::update_cache``, ``bibo::cache_attention``), which read only the slots up to
  each query's; the masked form, which XNNPACK delegates, read the whole static cache at every
  decode step.
* ``Rotary`` → ``MatmulRotary`` (ExecuTorch): RoPE's half rotation as a product with a constant
  signed permutation, which XNNPACK delegates; it takes no slice of a tensor whose length is
  dynamic, which the halves were.

``router_names`` finds the routers by their type, so that every int8 recipe keeps them float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import attention  # noqa: F401 - registers bibo::update_cache, cache_attention
from ..kernels.moe_experts import pack_int4, quantize_groups, quantize_rows
from ..model import BiBoForCausalLM
from ..model.attention import AttentionInputs, GroupedAttention
from ..model.layers import (CacheWrite, RMSNorm, Rotary, SwiGLU, causal_window, causal_windows,
                            conv_weight_as_linear)
from ..model.moe import MLPExperts, Router, Selection, SharedConvExpert

Swaps = dict[type[nn.Module], Callable[[nn.Module], nn.Module]]


def swap_modules(model: nn.Module, swaps: Swaps) -> nn.Module:
    """Replace, in place, every submodule whose type is a key of ``swaps`` by its factory's
    result; returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            factory = swaps.get(type(child))
            if factory is not None:
                setattr(parent, name, factory(child))
    return model


def export_form(model: BiBoForCausalLM, swaps: Swaps) -> BiBoForCausalLM:
    """``model`` in eval mode with ``swaps`` applied, in place: the export pipeline owns the
    model it transforms, and at 750M parameters a copy would cost 3 GB."""
    return swap_modules(model.eval(), swaps)


def router_names(model: nn.Module) -> set[str]:
    """Qualified names (relative to ``model``) of the modules whose outputs choose experts,
    found by type wherever they sit, whatever their attribute is called."""
    return {name for name, module in model.named_modules() if isinstance(module, Router)}


def no_drops(flat: Tensor) -> Tensor:
    return flat.new_zeros((), dtype=torch.float32)


# ------------------------------------------------------------------------------ experts
def expert_swiglus(experts: MLPExperts) -> list[SwiGLU]:
    """The stacked expert weights as one SwiGLU (three nn.Linear) per expert."""
    modules = []
    for gate, up, down in zip(experts.gate_proj, experts.up_proj, experts.down_proj):
        ffn = SwiGLU(gate.shape[1], gate.shape[0])
        with torch.no_grad():
            ffn.gate_proj.weight.copy_(gate)
            ffn.up_proj.weight.copy_(up)
            ffn.down_proj.weight.copy_(down)
        modules.append(ffn)
    return modules


class SkipUnselectedExperts(nn.Module):
    """Each expert runs only when some token selected it (``torch.cond`` → ONNX ``If``)."""

    def __init__(self, experts: MLPExperts) -> None:
        super().__init__()
        self.ffns = nn.ModuleList(expert_swiglus(experts))

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        # Which experts any token chose, for all experts at once: per expert, the graph then
        # only reads one flag, where a test of its own gate column took about seven small
        # nodes, run on every call (`bench`: 78 experts; the graph went from 1,961 to 1,529
        # nodes). Gate columns are sliced inside the branches, so only chosen experts do it.
        gates = selection.gates.to(flat.dtype)
        chosen = gates[:, :len(self.ffns)].ne(0).any(0)
        out = torch.zeros_like(flat)
        for e, ffn in enumerate(self.ffns):
            out = out + torch.cond(chosen[e], _weighted_expert(ffn, e), _no_expert,
                                   (flat, gates))
        return out, no_drops(flat)


def _weighted_expert(ffn: nn.Module, index: int) -> Callable[[Tensor, Tensor], Tensor]:
    def run(x: Tensor, gates: Tensor) -> Tensor:
        return ffn(x) * gates[:, index, None]
    return run


def _no_expert(x: Tensor, gates: Tensor) -> Tensor:
    return torch.zeros_like(x)


class FusedExperts(nn.Module):
    """All E experts as three Linears: gate and up stack the experts' rows ([E·m, h]), down
    joins their columns ([h, E·m]). Scaling expert e's block of the activation by its gate
    weight before the down projection makes Σ_e g_e · down_e(act_e) a single matmul
    (sort-tiny fp32 lowering: 183 s instead of 240 s for 3·E separate Linears).

    Built from stacked weights gate/up [E, m, h], down [E, h, m] (``of`` takes them from any
    experts module that has them)."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        super().__init__()
        num_experts, self.width, hidden = gate.shape
        self.gate_proj = nn.Linear(hidden, num_experts * self.width, bias=False)
        self.up_proj = nn.Linear(hidden, num_experts * self.width, bias=False)
        self.down_proj = nn.Linear(num_experts * self.width, hidden, bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate.reshape(-1, hidden))
            self.up_proj.weight.copy_(up.reshape(-1, hidden))
            self.down_proj.weight.copy_(down.permute(1, 0, 2).reshape(hidden, -1))

    @classmethod
    def of(cls, experts: MLPExperts | SelectedExperts) -> FusedExperts:
        return cls(*stacked_weights(experts))

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        num_experts = self.gate_proj.out_features // self.width
        act = F.silu(self.gate_proj(flat)) * self.up_proj(flat)  # [S, E·m]
        gates = selection.gates[:, :num_experts, None].to(flat.dtype)
        act = act.unflatten(-1, (num_experts, self.width)) * gates
        return self.down_proj(act.flatten(-2)), no_drops(flat)


def stacked_weights(experts: MLPExperts | SelectedExperts) -> tuple[Tensor, Tensor, Tensor]:
    """gate/up [E, m, h] and down [E, h, m] of either stacked-weight experts module."""
    if isinstance(experts, MLPExperts):
        return experts.gate_proj.detach(), experts.up_proj.detach(), experts.down_proj.detach()
    return experts.gate.detach(), experts.up.detach(), experts.down.detach()


def frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


class SelectedExperts(nn.Module):
    """The experts as one ``bibo::moe_experts`` call on the routing (indices, weights): on
    ExecuTorch its kernel computes each chosen expert once and reads no other."""

    def __init__(self, experts: MLPExperts) -> None:
        super().__init__()
        self.gate, self.up, self.down = (frozen(w) for w in stacked_weights(experts))

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        out = torch.ops.bibo.moe_experts(flat, selection.indices,
                                         selection.weights.to(flat.dtype),
                                         self.gate, self.up, self.down)
        return out, no_drops(flat)


class SelectedExpertsInt8(nn.Module):
    """``SelectedExperts`` with int8 weights, one float scale per row (``bibo::moe_experts_int8``,
    which also quantizes the activations to int8 per token at each call, as 8da8w does)."""

    def __init__(self, experts: SelectedExperts) -> None:
        super().__init__()
        for name, weight in zip(("gate", "up", "down"), stacked_weights(experts)):
            q, scale = self.quantize(weight)
            setattr(self, name, frozen(q))
            setattr(self, f"{name}_scale", frozen(scale))

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_rows(weight)

    def kernel(self, *args: Tensor) -> Tensor:
        return torch.ops.bibo.moe_experts_int8(*args)

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        out = self.kernel(flat, selection.indices, selection.weights.to(flat.dtype), self.gate,
                          self.gate_scale, self.up, self.up_scale, self.down, self.down_scale)
        return out, no_drops(flat)


class SelectedExpertsInt4(SelectedExpertsInt8):
    """``SelectedExperts`` with int4 weights, two to a byte, one float scale per group of
    ``group_size`` weights of a row (``bibo::moe_experts_int4``; activations int8 per token)."""

    def __init__(self, experts: SelectedExperts, group_size: int) -> None:
        self.group_size = group_size  # before the base class quantizes with it
        super().__init__(experts)

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        q, scale = quantize_groups(weight, self.group_size)
        return pack_int4(q), scale

    def kernel(self, *args: Tensor) -> Tensor:
        return torch.ops.bibo.moe_experts_int4(*args, self.group_size)


# ------------------------------------------------------------------------------ integer linears
class DynamicInt8Linear(nn.Module):
    """``nn.Linear`` as "8da8w": int8 weights with one scale per output channel
    (``quantize_rows``), activations quantized to int8 per token (asymmetric) at each call.
    It is written with the ``quantized_decomposed`` operators, a pattern XNNPACK runs as one
    int8 GEMM. torchao's 8da8w writes the same pattern with its own operators, but those are
    Python compositions that every pass of the ExecuTorch lowering re-runs on each re-trace:
    ``sort-tiny``'s int8 lowering spent about a third of its time in them."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = self.quantize(linear.weight)
        self.weight, self.scale = frozen(q), frozen(scale)
        self.bias = None if linear.bias is None else frozen(linear.bias)
        self.register_buffer("zero_point", torch.zeros_like(scale, dtype=torch.long),
                             persistent=False)

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_rows(weight)

    def forward(self, x: Tensor) -> Tensor:
        ops = torch.ops.quantized_decomposed
        scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        q = ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
        x = ops.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.weight, self.scale, self.zero_point, 0, -127, 127, torch.int8, out_dtype=dtype)


class DynamicInt4Linear(DynamicInt8Linear):
    """``nn.Linear`` as "8da4w": int4 weights (integers in [-8, 7], held as int8 until
    XNNPACK packs them) with one scale per group of ``group_size`` consecutive input weights
    (``quantize_groups``), activations as ``DynamicInt8Linear``'s. XNNPACK keeps the group
    scales in bfloat16, and needs the input width to be a multiple of the group size: a
    width that is not (the `reference` preset's 1,368-wide experts at any group size from 16
    up) is padded with zero weights, and each input with as many zeros, which adds nothing to
    any product and does not move the per-token activation scale."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        self.group_size = group_size  # before the base class quantizes with it
        self.padding = -linear.in_features % group_size
        super().__init__(linear)

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_groups(F.pad(weight, (0, self.padding)), self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, self.padding)) if self.padding else x)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel_group(
            self.weight, self.scale, self.zero_point, -8, 7, torch.int8, self.group_size, dtype)


# ------------------------------------------------------------------------------ shared expert
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
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight_as_linear(shared.conv.weight))
        self.up_proj = shared.up_proj
        self.down_proj = shared.down_proj

    def forward(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        padded, state = causal_window(u, state, self.kernel_size - 1)
        windows = causal_windows(padded, self.kernel_size)
        return self.down_proj(F.silu(self.conv(windows)) * self.up_proj(u)), state


# ------------------------------------------------------------------------------ cache
class ScatterCacheWrite(CacheWrite):
    """``CacheWrite`` as a scatter along the slot dimension: the same writes, on the cache as it
    is laid out."""

    def forward(self, cache: Tensor, slots: Tensor, new: Tensor) -> Tensor:
        index = slots.view(1, 1, -1, 1).expand_as(new)
        return cache.scatter(2, index, new.to(cache.dtype))


class InPlaceCacheWrite(CacheWrite):
    """``CacheWrite`` in place, by BiBo's ``bibo::update_cache``: the call's keys or values land
    in the same slots (consecutive, from the first), and the cache returned is ``cache`` itself.
    An out-of-place write (``index_copy``) copies the whole cache in every layer of every
    decode step."""

    def forward(self, cache: Tensor, slots: Tensor, new: Tensor) -> Tensor:
        torch.ops.bibo.update_cache(new, cache, first_slot(slots, new.shape[2], cache.shape[2]))
        return cache


def first_slot(slots: Tensor, length: int, cache_length: int) -> int:
    """The first of a call's ``length`` consecutive ``slots``, as the number the cache kernels
    take, bounded for the exporter: the call fits in the cache."""
    start = slots[0].item()
    torch._check(start >= 0)
    torch._check(start + length <= cache_length)
    return start


# ------------------------------------------------------------------------------ attention
class SdpaGroupedAttention(GroupedAttention):
    """``GroupedAttention`` as one ``scaled_dot_product_attention`` over the grouped KV heads,
    which the ONNX exporter writes (opset 23) as one ``Attention`` node in place of a dozen."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs,
                scale: float) -> Tensor:
        B, H, _, d = q.shape
        mask = inputs.mask
        if mask.dim() == 5:  # [B, 1, 1, T, K], laid out for the grouped form → [B, 1, T, K]
            mask = mask[:, :, 0]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2).reshape(B, -1, H * d)


# ------------------------------------------------------------------------------ norms
class MatmulMeanRMSNorm(RMSNorm):
    """``RMSNorm`` whose mean of squares is (x²) · 1 / n, a Linear with a constant ones row
    (exact in any dtype), the same value up to the order of the sum."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.register_buffer("ones", torch.ones(1, norm.weight.shape[0]), persistent=False)

    def mean_square(self, x32: Tensor) -> Tensor:
        return F.linear(x32 * x32, self.ones.to(x32.dtype)) / self.ones.shape[1]


class MatmulRotary(Rotary):
    """``Rotary`` whose half rotation is x · Pᵀ with P the signed permutation that maps
    [x₁, x₂] to [-x₂, x₁]: exact, each output is one input times ±1."""

    def __init__(self, rotary: Rotary) -> None:
        super().__init__(rotary.head_dim)
        half = rotary.head_dim // 2
        first, second = torch.arange(half), torch.arange(half, rotary.head_dim)
        rotation = torch.zeros(rotary.head_dim, rotary.head_dim)
        rotation[first, second] = -1.0
        rotation[second, first] = 1.0
        self.register_buffer("rotation", rotation, persistent=False)

    def rotate_half(self, x: Tensor) -> Tensor:
        return F.linear(x, self.rotation.to(x.dtype))


class CacheAttention(GroupedAttention):
    """``GroupedAttention`` over the static cache as BiBo's ``bibo::cache_attention``: causal
    from the call's first slot, each query reads the cache slots up to its own, where the
    masked form reads the whole static cache at every step. Unpadded calls only (the
    ExecuTorch program's)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs,
                scale: float) -> Tensor:
        start = first_slot(inputs.positions.slots, q.shape[2], k.shape[2])
        return torch.ops.bibo.cache_attention(q, k, v, start, scale)
