"""``bibo::moe_experts``, ``bibo::moe_experts_int8`` and ``bibo::moe_experts_int4``: the
routed SwiGLU experts, computed for the experts each token selected and no others.

    out[t] = Σ_j [e < E] · weights[t, j] · down_e(silu(gate_e · x_t) ⊙ (up_e · x_t)),
    e = indices[t, j]

``indices``/``weights`` [S, k] are BiBo's routing (docs/design.md), computed in the graph before
the call, so the operator needs no router of its own; indices ≥ E name the parameter-free
experts, which the graph adds itself, and are skipped. Weights are stacked per expert:
gate/up [E, m, h], down [E, h, m]; the int8 form stores them as int8 with one float32 scale
per row (symmetric, ``quantize_rows``) and multiplies them with int8 activations, quantized
the same way with one scale per token at each call, as 8da8w linears do. The int4 form stores
integers in [-8, 7] two to a byte (``pack_int4``) with one float32 scale per group of
``group_size`` consecutive weights of a row (``quantize_groups``), times the same int8
activations: "8da4w".

The implementations registered here are the reference semantics: ``torch.export`` records the
operator as one node (its fake implementation gives the shape), eager PyTorch runs it densely,
and ExecuTorch runs the C++ kernels of ``csrc/moe_experts.cpp`` through the ``.out`` variants,
which ``to_executorch`` selects. Tests compare the kernels against these implementations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_ROUTING = "Tensor x, Tensor indices, Tensor weights"
_FLOAT = "Tensor gate, Tensor up, Tensor down"
_INT8 = ("Tensor gate, Tensor gate_scale, Tensor up, Tensor up_scale, Tensor down, "
         "Tensor down_scale")

_INT4 = f"{_INT8}, int group_size"

_library = torch.library.Library("bibo", "DEF")
for _name, _weights in (("moe_experts", _FLOAT), ("moe_experts_int8", _INT8),
                        ("moe_experts_int4", _INT4)):
    _library.define(f"{_name}({_ROUTING}, {_weights}) -> Tensor")
    _library.define(f"{_name}.out({_ROUTING}, {_weights}, *, Tensor(a!) out) -> Tensor(a!)")


def mixed_experts(x: Tensor, indices: Tensor, weights: Tensor, num_experts: int,
                  project: Callable[[Tensor, str, int], Tensor]) -> Tensor:
    """The operator's meaning, written densely: every expert on every token, weighted by the
    routing weight the token gave it (0 if it did not choose it; a repeated choice adds its
    weights). ``project(v, name, e)``: v times expert e's ``name`` matrix (gate, up, down)."""
    out = torch.zeros_like(x)
    for e in range(num_experts):
        weight = (weights * (indices == e)).sum(-1, keepdim=True)
        hidden = F.silu(project(x, "gate", e)) * project(x, "up", e)
        out = out + weight * project(hidden, "down", e)
    return out


def selected_experts(x: Tensor, indices: Tensor, weights: Tensor, gate: Tensor, up: Tensor,
                     down: Tensor) -> Tensor:
    """The float operator."""
    matrices = {"gate": gate, "up": up, "down": down}
    return mixed_experts(x, indices, weights, gate.shape[0],
                         lambda v, name, e: v @ matrices[name][e].t())


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x [S, in] float times int8 rows weight [out, in]: x quantized per token, the integer
    products summed exactly, then scaled by the token's scale and the row's, in that order.

    The float matmul of the integers is exact while a sum stays below 2^24 (inputs up to
    1,040 wide); past that it rounds where the kernel's int32 sum does not."""
    q, scale = quantize_rows(x)
    return q.float() @ weight.float().t() * scale[:, None] * weight_scale


def selected_experts_int8(x: Tensor, indices: Tensor, weights: Tensor, gate: Tensor,
                          gate_scale: Tensor, up: Tensor, up_scale: Tensor, down: Tensor,
                          down_scale: Tensor) -> Tensor:
    """The int8 operator: every product an ``int8_linear``, so each token's input and each
    expert's hidden activation are quantized per token."""
    matrices = {"gate": (gate, gate_scale), "up": (up, up_scale), "down": (down, down_scale)}

    def project(v: Tensor, name: str, e: int) -> Tensor:
        weight, scale = matrices[name]
        return int8_linear(v, weight[e], scale[e])
    return mixed_experts(x, indices, weights, gate.shape[0], project)


def selected_experts_int4(x: Tensor, indices: Tensor, weights: Tensor, gate: Tensor,
                          gate_scale: Tensor, up: Tensor, up_scale: Tensor, down: Tensor,
                          down_scale: Tensor, group_size: int) -> Tensor:
    """The int4 operator: as the int8 one, with each weight row's integers unpacked from
    nibbles and scaled per group (``int4_linear``)."""
    matrices = {"gate": (gate, gate_scale), "up": (up, up_scale), "down": (down, down_scale)}

    def project(v: Tensor, name: str, e: int) -> Tensor:
        packed, scale = matrices[name]
        return int4_linear(v, packed[e], scale[e], group_size)
    return mixed_experts(x, indices, weights, gate.shape[0], project)


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """x [S, in] float times packed int4 rows [out, ⌈in/2⌉] with scales [out, groups]: x
    quantized per token to int8, each group's integer products summed exactly, scaled by the
    group's scale and summed over groups, then scaled by the token's scale."""
    q, x_scale = quantize_rows(x)
    columns = x.shape[-1]
    weight = unpack_int4(packed, columns).float()
    out = torch.zeros(x.shape[0], weight.shape[0])
    for g, start in enumerate(range(0, columns, group_size)):
        part = slice(start, start + group_size)
        out = out + q[:, part].float() @ weight[:, part].t() * scale[:, g]
    return out * x_scale[:, None]


def quantize_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric int4 with one scale per group of ``group_size`` consecutive weights of a row
    (the last group of a row may be shorter): integers in [-8, 7] (as int8) and float32
    scales [..., rows, groups], w ≈ q · scale. The scale is max |w| / 7.5, torchao's choice
    for 4 bits: the whole range [-8, 7] is used, and no weight rounds further than half a
    step (the largest positive, 7.5 steps, clamps to 7)."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"the int4 group size must be an even number >= 2, got {group_size}")
    columns = weight.shape[-1]
    groups = -(-columns // group_size)
    padded = F.pad(weight, (0, groups * group_size - columns))
    blocks = padded.reshape(*weight.shape[:-1], groups, group_size)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / 7.5
    q = torch.round(blocks / scale[..., None]).clamp(-8, 7).to(torch.int8)
    return q.flatten(-2)[..., :columns], scale.float()


def pack_int4(q: Tensor) -> Tensor:
    """Integers in [-8, 7] [..., n] two to a byte, [..., ⌈n/2⌉] uint8: column 2i in the low
    nibble, 2i + 1 in the high one (a zero nibble pads an odd n), each as two's complement."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor, columns: int) -> Tensor:
    """``pack_int4``'s inverse: [..., columns] int8 in [-8, 7]."""
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], -1).flatten(-2)[..., :columns]
    return q - 16 * (q > 7).to(torch.int8)


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row (the last dimension is the row): w ≈ q · scale.
    Also the int8 operator's activations (a row per token) and the ONNX recipe's int8
    embedding tables (ExecuTorch's ``embedding_byte`` scheme)."""
    scale = weight.abs().amax(-1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def out_variant(fn):  # noqa: ANN001, ANN202 - wraps any operator's implementation
    """The ``.out`` form of an operator implementation: its result copied into ``out``."""
    def run(*args: Tensor, out: Tensor) -> Tensor:
        result = fn(*args)
        out.resize_(result.shape).copy_(result)
        return out
    return run


def _fake(x: Tensor, *args: Tensor) -> Tensor:
    return torch.empty_like(x)


def fake_out(*args: Tensor, out: Tensor) -> Tensor:
    """Any ``.out`` operator's fake implementation: the result is ``out``."""
    return out


for _name, _fn in (("moe_experts", selected_experts), ("moe_experts_int8", selected_experts_int8),
                   ("moe_experts_int4", selected_experts_int4)):
    _library.impl(_name, _fn, "CompositeExplicitAutograd")
    _library.impl(f"{_name}.out", out_variant(_fn), "CompositeExplicitAutograd")
    _library.impl(_name, _fake, "Meta")
    _library.impl(f"{_name}.out", fake_out, "Meta")
