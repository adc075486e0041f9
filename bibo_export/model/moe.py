"""BiBo's mixture-of-experts layer with static-shape capacity dispatch (docs/design.md).

Expert indices: 0 … n-4 are SwiGLU MLPs, n-3 Identity, n-2 Zero, n-1 ReLU². Only the MLP
experts have parameters and capacity slots; the other three are elementwise. Three dispatch
formulations compute the same function at different costs:

* ``index``: gather tokens into an [E, C, h] buffer with index_add, bmm, scatter back (linear in S);
* ``einsum``: one-hot dispatch/combine masks [S, E, C] and matmuls (quadratic in S; TPU-classic);
* ``grouped``: sort assignments by expert, one grouped matmul per projection; never drops
  (CUDA's ``torch._grouped_mm``, also on CPU; not on XLA);
* ``dense``: every MLP expert on every token, no capacity (the oracle).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..config import BiBoConfig, ExecutionOptions
from .layers import MATMUL_ALIGNMENT, causal_conv1d

LOGIT_STD_EPS = 1e-6
TOPK_NORM_EPS = 1e-6


@dataclass
class RoutingStats:
    """What one MoE call routed: the input of the load-balancing bias update."""

    expert_counts: Tensor  # [n] fp32, assignments per expert (before capacity drops)
    dropped: Tensor  # [] fp32, MLP-expert assignments past capacity
    num_tokens: int
    probs_sum: Tensor | None = None  # [n] fp32, Σ over tokens of p = softmax(z̃); has gradients


# A pytree node, so that torch.export and torch.compile accept it among a model's outputs.
pytree.register_pytree_node(
    RoutingStats, lambda s: ([s.expert_counts, s.dropped, s.probs_sum], s.num_tokens),
    lambda children, num_tokens: RoutingStats(children[0], children[1], num_tokens,
                                              children[2]),
    serialized_type_name="bibo_export.RoutingStats")


@dataclass
class Selection:
    """One MoE call's routing decision, the input of every expert formulation."""

    indices: Tensor  # [S, k] chosen experts, best first
    weights: Tensor  # [S, k] fp32 mixing weights
    gates: Tensor  # [S, n] fp32, the weights scattered to their experts (0 elsewhere)
    probs: Tensor  # [S, n] fp32, p = softmax(z̃) over every expert


# --------------------------------------------------------------------------------- routing
class Router(nn.Module):
    """Marks the modules whose outputs choose experts. Exporters find routers by this type and
    keep them float: a routing flip is a discrete, unbounded error (docs/export.md)."""


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off, where it is on: bf16 autocast would otherwise run the router's matmul in
    bf16 despite its fp32 inputs. Nothing is entered when autocast is off (export, inference)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LinearRouter(nn.Linear, Router):
    """z = W_r u in fp32, whatever the model's dtype and under autocast too."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__(hidden_size, num_experts, bias=False)

    def forward(self, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, None]:
        with without_autocast(u.device.type):
            return F.linear(u.float(), self.weight.float()), None


class ConvRouter(nn.Conv1d, Router):
    """z = causal Conv1d_K(u) over time in fp32; returns the conv's new state too."""

    def __init__(self, hidden_size: int, num_experts: int, kernel_size: int) -> None:
        super().__init__(hidden_size, num_experts, kernel_size, bias=False)

    def forward(self, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with without_autocast(u.device.type):
            return causal_conv1d(u.float(), self.weight.float(), state, as_matmul=self.training)


def normalize_logits(logits: Tensor, router_lambda: float) -> Tensor:
    """z̃ = λ (z − mean z) / (std z + ε), per token over the experts (unbiased std).

    The std is written out because torch_xla 2.9 has no autograd kernel for ``aten::std``.
    """
    centered = logits - logits.mean(-1, keepdim=True)
    std = torch.sqrt(centered.square().sum(-1, keepdim=True) / (logits.shape[-1] - 1))
    return router_lambda * centered / (std + LOGIT_STD_EPS)


def select_experts(normalized: Tensor, bias: Tensor, top_k: int,
                   renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of z̃ + b (b steers selection only), weighted by p = softmax(z̃) at the chosen
    experts. Returns indices [S, k] in priority order (best first), fp32 weights [S, k] and p
    [S, n]."""
    probs = torch.softmax(normalized, dim=-1)
    _, indices = torch.topk(normalized + bias, top_k, dim=-1)
    weights = probs.gather(-1, indices)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + TOPK_NORM_EPS)
    return indices, weights, probs


def capacity_slots(indices: Tensor, num_mlp_experts: int,
                   capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Slot of every assignment in its expert, GShard-style, flattened k-major.

    k-major order puts every token's first choice before any token's second choice, so a full
    expert drops low-priority assignments first. Returns (expert [kS], position [kS], keep [kS]);
    ``keep`` is False for parameter-free experts and for assignments past ``capacity``.
    """
    expert = indices.t().reshape(-1)
    is_mlp = expert < num_mlp_experts
    one_hot = F.one_hot(expert.clamp(max=num_mlp_experts - 1), num_mlp_experts)
    one_hot = one_hot * is_mlp[:, None]
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    return expert, position, is_mlp & (position < capacity)


def balance_loss(counts: Tensor, mean_probs: Tensor, coef: float) -> Tensor:
    """The auxiliary load-balancing loss coef · n · Σ_e f_e · P_e, averaged over MoE layers.

    ``counts`` [L, n]: assignments per expert, from which f_e is each expert's share; they are
    discrete, so gradients flow through ``mean_probs`` [L, n] (P_e, the mean router probability
    of e) only. Both cover the whole global batch. Perfect balance gives coef; one expert
    taking everything gives coef · n.
    """
    fractions = counts / counts.sum(-1, keepdim=True)
    return coef * counts.shape[-1] * (fractions * mean_probs).sum(-1).mean()


def update_router_bias(bias: Tensor, tokens_seen: Tensor, counts: Tensor, stats: RoutingStats,
                       threshold: int, factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """The aux-loss-free load-balancing rule as a pure function (docs/design.md).

    Counters accumulate; once ``threshold`` tokens are seen, b_e += u·sign(mean(counts) − counts_e)
    and the counters reset. ``torch.where`` keeps it one static graph: no host sync, no branch.
    """
    tokens_seen = tokens_seen + stats.num_tokens
    counts = counts + stats.expert_counts
    due = tokens_seen >= threshold
    stepped = bias + factor * torch.sign(counts.mean() - counts)
    return (torch.where(due, stepped, bias), torch.where(due, torch.zeros_like(tokens_seen),
                                                         tokens_seen),
            torch.where(due, torch.zeros_like(counts), counts))


# --------------------------------------------------------------------------------- experts
class MLPExperts(nn.Module):
    """E SwiGLU experts with stacked weights [E, out, in], computed by capacity dispatch.

    ``execution`` picks the formulation and capacity (``BiBoForCausalLM.set_execution``).
    """

    def __init__(self, num_experts: int, hidden_size: int, width: int,
                 execution: ExecutionOptions | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.execution = execution or ExecutionOptions()

    def apply_to_slots(self, x: Tensor) -> Tensor:
        """Each expert on its own slots: x [E, C, h] → [E, C, h]."""
        gate = torch.bmm(x, self.gate_proj.transpose(1, 2))
        up = torch.bmm(x, self.up_proj.transpose(1, 2))
        return torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        """The experts' weighted sum [S, h] and the number of dropped assignments."""
        num_experts = self.gate_proj.shape[0]
        if self.execution.dispatch in ("dense", "grouped"):  # neither ever drops
            dropped = flat.new_zeros((), dtype=torch.float32)
            if self.execution.dispatch == "grouped":
                return dispatch_grouped(flat, self, selection.indices, selection.weights), dropped
            return dispatch_dense(flat, self, selection.gates[:, :num_experts]), dropped
        num_tokens, top_k = selection.indices.shape
        capacity = self.execution.expert_capacity(num_tokens, top_k, selection.gates.shape[1])
        expert, position, keep = capacity_slots(selection.indices, num_experts, capacity)
        dropped = ((expert < num_experts) & ~keep).sum().float()
        dispatch = dispatch_index if self.execution.dispatch == "index" else dispatch_einsum
        out = dispatch(flat, self, expert, position, keep, selection.weights.t().reshape(-1),
                       capacity)
        return out, dropped


class SharedConvExpert(nn.Module):
    """Always-on expert: down(silu(CausalConv1d_K(u)) * up(u)), no biases."""

    def __init__(self, hidden_size: int, width: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden_size, width, kernel_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.training:
            return self.forward_aligned(u, state)
        conv, state = causal_conv1d(u, self.conv.weight, state)
        return self.down_proj(F.silu(conv) * self.up_proj(u)), state

    def forward_aligned(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Training's form of the same function: the convolution as one matmul, and the width
        zero-padded to a multiple of MATMUL_ALIGNMENT. cuBLAS runs Hopper's own kernels only
        on 16-byte-aligned rows: at ``reference`` size (width 684) the expert's nine matmuls
        per layer, forward and backward, ran in Ampere kernels, 4.3 ms of a 39 ms train step
        at 4×1,024 tokens; padded, all of the step's matmuls took 16.0 ms where they took
        19.3 (H200, 2026-11-28). The added rows are zeros: they add exact zeros to the
        output, and their gradients are dropped with the padding."""
        conv_weight, up_weight = self.conv.weight, self.up_proj.weight
        down_weight = self.down_proj.weight
        pad = -up_weight.shape[0] % MATMUL_ALIGNMENT
        if pad:  # F.pad copies even when it adds nothing
            conv_weight = F.pad(conv_weight, (0, 0, 0, 0, 0, pad))
            up_weight = F.pad(up_weight, (0, 0, 0, pad))
            down_weight = F.pad(down_weight, (0, pad))
        conv, state = causal_conv1d(u, conv_weight, state, as_matmul=True)
        return F.linear(F.silu(conv) * F.linear(u, up_weight), down_weight), state


def dispatch_index(u: Tensor, experts: MLPExperts, expert: Tensor, position: Tensor,
                   keep: Tensor, weight: Tensor, capacity: int) -> Tensor:
    """Gather kept assignments into [E, C, h] slots, run the experts, scatter-add back."""
    num_tokens, hidden = u.shape
    num_experts = experts.gate_proj.shape[0]
    token = torch.arange(expert.shape[0], device=u.device) % num_tokens
    overflow = num_experts * capacity  # one spare row absorbs everything not kept
    slot = torch.where(keep, expert * capacity + position, overflow)
    slots = u.new_zeros(overflow + 1, hidden).index_add(0, slot, u.index_select(0, token))
    out = experts.apply_to_slots(slots[:overflow].view(num_experts, capacity, hidden))
    out = out.reshape(overflow, hidden)
    out = torch.cat([out, out.new_zeros(1, hidden)])
    contribution = out.index_select(0, slot) * (weight * keep).to(u.dtype)[:, None]
    return u.new_zeros(num_tokens, hidden).index_add(0, token, contribution)


def dispatch_einsum(u: Tensor, experts: MLPExperts, expert: Tensor, position: Tensor,
                    keep: Tensor, weight: Tensor, capacity: int) -> Tensor:
    """Same as ``dispatch_index`` with one-hot [S, E, C] masks and matmuls only."""
    num_tokens = u.shape[0]
    num_experts = experts.gate_proj.shape[0]
    top_k = expert.shape[0] // num_tokens
    expert_mask = F.one_hot(expert.clamp(max=num_experts - 1), num_experts).to(u.dtype)
    expert_mask = (expert_mask * keep[:, None].to(u.dtype)).view(top_k, num_tokens, num_experts)
    slot_mask = F.one_hot(position.clamp(0, capacity - 1), capacity).to(u.dtype)
    slot_mask = slot_mask.view(top_k, num_tokens, capacity)
    dispatch = torch.einsum("kse,ksc->sec", expert_mask, slot_mask)
    combine = torch.einsum("kse,ksc->sec",
                           expert_mask * weight.to(u.dtype).view(top_k, num_tokens, 1), slot_mask)
    out = experts.apply_to_slots(torch.einsum("sec,sh->ech", dispatch, u))
    return torch.einsum("sec,ech->sh", combine, out)


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x [A, in] in consecutive groups (ending at ``offsets`` [E], int32) times their
    group's weight [E, out, in]ᵀ → [A, out]. Rows past the last group come out undefined:
    the caller masks them. In the autocast dtype where autocast is on (``_grouped_mm`` has no
    autocast rule), with both dimensions zero-padded to MATMUL_ALIGNMENT: the kernel requires
    16-byte-aligned rows, and its backward multiplies by the output's gradient, so the output's
    width must be aligned too."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out_features, in_features = weight.shape[1:]
    pad_in = -in_features % MATMUL_ALIGNMENT
    pad_out = -out_features % MATMUL_ALIGNMENT
    x, weight = x.to(dtype), weight.to(dtype)
    if pad_in or pad_out:  # F.pad copies even when it adds nothing
        x = F.pad(x, (0, pad_in))
        weight = F.pad(weight, (0, pad_in, 0, pad_out))
    with without_autocast(device):
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    return out[:, :out_features]


class PermutedRows(torch.autograd.Function):
    """``rows.index_select(0, index // repeats)`` for ``index`` a permutation of
    ``len(rows) · repeats`` places with the inverse ``inverse``: with ``repeats`` k, tokens'
    rows [S, h] copied to their S·k assignments in expert order.

    Its gradient gathers back through the inverse, summing each row's k copies, where
    index_select's own backward scatter-adds, which CUDA runs with atomics. Gathers and
    scatters took 2.6 ms of GPU time per ``reference`` 4×1,024 train step, 1.8 ms with this
    (H200, 2026-11-28)."""

    @staticmethod
    def forward(rows: Tensor, index: Tensor, inverse: Tensor, repeats: int) -> Tensor:
        return rows.index_select(0, index // repeats)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - autograd's signature
        _, index, inverse, repeats = inputs
        ctx.repeats = repeats
        ctx.save_for_backward(index, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        index, inverse = ctx.saved_tensors
        rows = PermutedRows.apply(grad, inverse, index, 1)
        return rows.view(-1, ctx.repeats, grad.shape[-1]).sum(1), None, None, None


def dispatch_grouped(u: Tensor, experts: MLPExperts, indices: Tensor, weights: Tensor) -> Tensor:
    """Dropless: sort the S·k assignments by expert, run each projection as one grouped matmul
    over the MLP experts' groups, mix back. No capacity slots, so no padding FLOPs and no drops;
    the parameter-free experts' assignments sort last and are masked out."""
    num_tokens, top_k = indices.shape
    num_experts = experts.gate_proj.shape[0]
    expert = indices.reshape(-1)  # token-major: assignment a belongs to token a // k
    order = torch.argsort(expert, stable=True)
    assignments = torch.arange(expert.shape[0], device=u.device)
    position = torch.empty_like(order).scatter_(0, order, assignments)  # order's inverse
    group_sizes = (expert[:, None] == torch.arange(num_experts, device=u.device)).sum(0)
    offsets = group_sizes.cumsum(0).to(torch.int32)
    routed = (assignments < offsets[-1])[:, None]
    # Masked before and after: the kernel leaves the rows past the last group undefined, in its
    # output and in its input gradient, and torch.where passes neither on.
    x = torch.where(routed, PermutedRows.apply(u, order, position, top_k), 0)
    hidden = F.silu(grouped_matmul(x, experts.gate_proj, offsets)) * \
        grouped_matmul(x, experts.up_proj, offsets)
    out = torch.where(routed, grouped_matmul(hidden, experts.down_proj, offsets), 0)
    # Back to token-major order (the inverse permutation), then each token's k contributions.
    out = PermutedRows.apply(out.to(u.dtype), position, order, 1).view(num_tokens, top_k, -1)
    return (out * weights[..., None].to(u.dtype)).sum(1)


def dispatch_dense(u: Tensor, experts: MLPExperts, gates: Tensor) -> Tensor:
    """Every MLP expert on every token, mixed by the dense gate matrix [S, E]: the oracle."""
    num_experts = experts.gate_proj.shape[0]
    out = experts.apply_to_slots(u.expand(num_experts, *u.shape))
    return torch.einsum("se,esh->sh", gates.to(u.dtype), out)


# --------------------------------------------------------------------------------- the layer
class MoE(nn.Module):
    def __init__(self, config: BiBoConfig, execution: ExecutionOptions | None = None) -> None:
        super().__init__()
        h, n = config.hidden_size, config.num_routed_experts
        self.config = config
        self.router = (LinearRouter(h, n) if config.router_type == "mlp"
                       else ConvRouter(h, n, config.kernel_size))
        self.experts = MLPExperts(config.num_mlp_experts, h, config.moe_intermediate_size,
                                  execution)
        self.shared_expert = SharedConvExpert(h, config.moe_intermediate_size, config.kernel_size)
        # Load-balancing state: not trained, saved with the checkpoint, always fp32.
        self.register_buffer("expert_bias", torch.zeros(n))
        self.register_buffer("tokens_seen", torch.zeros(()))
        self.register_buffer("expert_counts", torch.zeros(n))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # model.to(bf16) must not round the balancing counters and bias (docs/design.md).
        super()._apply(fn, recurse)
        for name in ("expert_bias", "tokens_seen", "expert_counts"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def select(self, logits: Tensor) -> Selection:
        """Noise (training only), logit normalisation, biased top-k and weights (docs/design.md)."""
        config = self.config
        if self.training and config.router_noise > 0:
            logits = logits + torch.randn_like(logits) * math.sqrt(config.router_noise)
        indices, weights, probs = select_experts(normalize_logits(logits, config.router_lambda),
                                                 self.expert_bias, config.num_experts_per_tok,
                                                 config.norm_topk_prob)
        gates = torch.zeros_like(logits).scatter_add(-1, indices, weights)
        return Selection(indices, weights, gates, probs)

    def forward(self, u: Tensor, cache: dict[str, Tensor] | None,
                is_token: Tensor | None = None) -> tuple[Tensor, RoutingStats, dict[str, Tensor]]:
        """u [B, T, h] (post-attention norm) → (output [B, T, h], routing stats, new conv states).

        ``is_token`` [B, T] is False at left padding: padding enters the causal convolutions
        as zeros, exactly the zero state a sequence starts from.
        """
        B, T, h = u.shape
        if is_token is not None:
            u = u * is_token[..., None].to(u.dtype)
        states = {} if cache is None else cache
        logits, router_state = self.router(u, states.get("router_conv"))
        # Shapes say -1 for the token count: see Attention.forward.
        selection = self.select(logits.reshape(-1, logits.shape[-1]))
        flat = u.reshape(-1, h)
        routed, dropped = self.experts(flat, selection)
        gates, n = selection.gates, self.config.num_routed_experts
        free = gates[:, n - 3, None].to(u.dtype) * flat + \
            gates[:, n - 1, None].to(u.dtype) * F.relu(flat).square()  # Identity, ReLU²; Zero adds 0
        shared, shared_state = self.shared_expert(u, states.get("shared_conv"))
        out = (routed + free).view(B, -1, h) + self.config.moe_shared_scaling * shared

        stats = RoutingStats(
            expert_counts=torch.zeros_like(self.expert_counts).scatter_add(
                0, selection.indices.reshape(-1), torch.ones_like(selection.weights).reshape(-1)),
            dropped=dropped, num_tokens=B * T, probs_sum=selection.probs.sum(0))
        new_cache = {"shared_conv": shared_state}
        if router_state is not None:
            new_cache["router_conv"] = router_state
        return out, stats, new_cache

    @torch.no_grad()
    def apply_routing_stats(self, stats: RoutingStats) -> None:
        """Fold one training call's statistics into the counters and maybe step the bias."""
        bias, tokens, counts = update_router_bias(
            self.expert_bias, self.tokens_seen, self.expert_counts, stats,
            self.config.bias_update_threshold, self.config.bias_update_factor)
        self.expert_bias.copy_(bias)
        self.tokens_seen.copy_(tokens)
        self.expert_counts.copy_(counts)
