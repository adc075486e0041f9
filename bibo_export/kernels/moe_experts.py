"""``bibo::moe_experts`` and ``bibo::moe_experts_int8``: the routed SwiGLU experts, computed
for the experts each token selected and no others.

    out[t] = Σ_j [e < E] · weights[t, j] · down_e(silu(gate_e · x_t) ⊙ (up_e · x_t)),
    e = indices[t, j]

``indices``/``weights`` [S, k] are BiBo's routing (docs/design.md), computed in the graph before
the call, so the operator needs no router of its own; indices ≥ E name the parameter-free
experts, which the graph adds itself, and are skipped. Weights are stacked per expert:
gate/up [E, m, h], down [E, h, m]; the int8 form stores them as int8 with one float32 scale
per row (symmetric, ``quantize_rows``) and multiplies them with int8 activations, quantized
the same way with one scale per token at each call, as 8da8w linears do.

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

_library = torch.library.Library("bibo", "DEF")
for _name, _weights in (("moe_experts", _FLOAT), ("moe_experts_int8", _INT8)):
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


for _name, _fn in (("moe_experts", selected_experts), ("moe_experts_int8", selected_experts_int8)):
    _library.impl(_name, _fn, "CompositeExplicitAutograd")
    _library.impl(f"{_name}.out", out_variant(_fn), "CompositeExplicitAutograd")
    _library.impl(_name, _fake, "Meta")
    _library.impl(f"{_name}.out", fake_out, "Meta")
