"""Capacity dispatch (index, einsum) and the dropless grouped matmuls against the dense
formulation and a per-token loop."""

import pytest
import torch

from bibo_export.config import ExecutionOptions
from bibo_export.model.moe import (MoE, capacity_slots, dispatch_einsum, dispatch_index,
                                   normalize_logits, select_experts)
from helpers import swiglu_reference, tiny_config

TOL = 1e-5


def make_moes(config, modes=("dense", "index", "einsum", "grouped")):
    """One MoE per dispatch mode, all with the same weights and a non-zero router bias."""
    torch.manual_seed(0)
    moes = {}
    for mode in modes:
        moe = MoE(config, ExecutionOptions(dispatch=mode))
        if moes:
            moe.load_state_dict(next(iter(moes.values())).state_dict())
        else:
            for p in moe.parameters():
                torch.nn.init.normal_(p, std=0.2)
            moe.expert_bias.normal_(std=0.5)
        moes[mode] = moe.train()
    return moes


@pytest.mark.parametrize("router_type", ["mlp", "conv"])
@pytest.mark.parametrize("n, k", [(4, 2), (8, 3), (16, 6)])
# Widths that torch._grouped_mm takes as they are (multiples of 8) and that it needs padded.
@pytest.mark.parametrize("hidden, width", [(32, 24), (36, 21)])
def test_no_drop_dispatch_equals_dense(router_type, n, k, hidden, width):
    config = tiny_config(router_type=router_type, num_routed_experts=n, num_experts_per_tok=k,
                         kernel_size=3 if router_type == "mlp" else 4, hidden_size=hidden,
                         num_attention_heads=2, num_key_value_heads=2,
                         moe_intermediate_size=width)
    moes = make_moes(config)
    u = torch.randn(3, 7, config.hidden_size)
    results = {}
    for mode, moe in moes.items():
        x = u.clone().requires_grad_(True)
        out, stats, _ = moe(x, None)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[mode] = (out, x.grad, {n: p.grad for n, p in moe.named_parameters()}, stats)
    dense_out, dense_dx, dense_grads, dense_stats = results["dense"]
    for mode in ("index", "einsum", "grouped"):
        out, dx, grads, stats = results[mode]
        assert (out - dense_out).abs().max() <= TOL, mode
        assert (dx - dense_dx).abs().max() <= TOL, mode
        for name, grad in grads.items():
            assert (grad - dense_grads[name]).abs().max() <= TOL, (mode, name)
        assert stats.dropped.item() == 0
        assert torch.equal(stats.expert_counts, dense_stats.expert_counts)
    assert dense_stats.expert_counts.sum().item() == 3 * 7 * k


def test_grouped_dispatch_under_bf16_autocast_matches_fp32_dense():
    """The CUDA training path: bf16 autocast, which ``torch._grouped_mm`` does not apply by
    itself. Within bf16's rounding of the fp32 oracle, gradients included."""
    config = tiny_config(num_routed_experts=16, num_experts_per_tok=6, moe_intermediate_size=21)
    moes = make_moes(config, modes=("dense", "grouped"))
    u = torch.randn(4, 9, config.hidden_size)
    results = {}
    for mode, moe in moes.items():
        x = u.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "grouped"):
            out, _, _ = moe(x, None)
        out.float().square().sum().backward()
        results[mode] = out.float(), x.grad, moe.experts.down_proj.grad
    for got, want in zip(results["grouped"], results["dense"], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def priority_keep(indices, num_mlp, capacity):
    """Reference capacity rule: first choices of all tokens, then second choices, ...;
    an MLP expert accepts assignments until it holds ``capacity`` of them."""
    num_tokens, top_k = indices.shape
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    used = [0] * num_mlp
    for j in range(top_k):
        for s in range(num_tokens):
            e = int(indices[s, j])
            if e < num_mlp and used[e] < capacity:
                keep[s, j] = True
                used[e] += 1
    return keep


def loop_reference(u, experts, indices, weights, keep):
    """sum_j w_j E_j(u) over kept MLP assignments, token by token."""
    out = torch.zeros_like(u)
    for s in range(u.shape[0]):
        for j in range(indices.shape[1]):
            if keep[s, j]:
                e = int(indices[s, j])
                out[s] += weights[s, j] * swiglu_reference(
                    u[s], experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])
    return out


@pytest.mark.parametrize("dispatch", [dispatch_index, dispatch_einsum])
@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_small_capacity_drops_exactly_the_low_priority_assignments(dispatch, capacity):
    config = tiny_config(num_routed_experts=8, num_experts_per_tok=3)
    moe = make_moes(config, modes=("index",))["index"]
    u = torch.randn(20, config.hidden_size)
    # Skewed logits so some experts are oversubscribed.
    logits = torch.randn(20, 8) + torch.tensor([3.0, 2.0, 0, 0, 0, 0, 0, 0])
    indices, weights, _ = select_experts(normalize_logits(logits, 1.0), moe.expert_bias, 3,
                                         True)
    expert, position, keep = capacity_slots(indices, config.num_mlp_experts, capacity)

    expected_keep = priority_keep(indices, config.num_mlp_experts, capacity)
    assert torch.equal(keep.view(3, 20).t(), expected_keep)
    assert expected_keep.sum() < (indices < config.num_mlp_experts).sum()  # something dropped

    with torch.no_grad():
        out = dispatch(u, moe.experts, expert, position, keep, weights.t().reshape(-1), capacity)
        ref = loop_reference(u, moe.experts, indices, weights, expected_keep)
    assert (out - ref).abs().max() <= TOL


def test_layer_reports_drops_with_a_small_capacity_factor():
    config = tiny_config()
    moe = make_moes(config, modes=("index",))["index"]
    moe.experts.execution = ExecutionOptions(capacity_factor=0.25)
    _, stats, _ = moe(torch.randn(2, 16, config.hidden_size), None)
    assert stats.dropped.item() > 0


@pytest.mark.parametrize("router_type", ["mlp", "conv"])
def test_router_logits_stay_fp32_under_bf16_autocast(router_type):
    """Mixed-precision training must route with the fp32 logits that inference routes with."""
    moe = make_moes(tiny_config(router_type=router_type), modes=("index",))["index"]
    u = torch.randn(2, 5, moe.config.hidden_size)
    expected, _ = moe.router(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = moe.router(u)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
