"""The aux-loss-free load-balancing bias: a pure, in-graph update applied by the train step."""

import pytest
import torch

from bibo_export.model import BiBoForCausalLM, RoutingStats, update_router_bias
from helpers import tiny_config


def test_hand_computed_update_moves_bias_by_u_and_resets():
    bias = torch.tensor([0.5, 0.0, 0.0, -0.5])
    tokens, counts = torch.tensor(6.0), torch.tensor([3.0, 1.0, 1.0, 1.0])
    stats = RoutingStats(expert_counts=torch.tensor([2.0, 0.0, 2.0, 4.0]),
                         dropped=torch.tensor(0.0), num_tokens=4)
    # Totals become counts [5, 1, 3, 5] (mean 3.5) over 10 tokens >= threshold 10.
    new_bias, new_tokens, new_counts = update_router_bias(bias, tokens, counts, stats, 10, 0.25)
    assert torch.equal(new_bias, torch.tensor([0.25, 0.25, 0.25, -0.75]))
    assert new_tokens.item() == 0
    assert torch.equal(new_counts, torch.zeros(4))


def test_below_threshold_only_accumulates():
    bias = torch.tensor([0.1, 0.2, 0.3, 0.4])
    stats = RoutingStats(expert_counts=torch.tensor([1.0, 2.0, 3.0, 0.0]),
                         dropped=torch.tensor(0.0), num_tokens=2)
    new_bias, tokens, counts = update_router_bias(bias, torch.tensor(3.0), torch.ones(4),
                                                  stats, 10, 0.25)
    assert torch.equal(new_bias, bias)
    assert tokens.item() == 5
    assert torch.equal(counts, torch.tensor([2.0, 3.0, 4.0, 1.0]))


def counters(model):
    return [(m.expert_bias.clone(), m.tokens_seen.clone(), m.expert_counts.clone())
            for m in model.moe_layers]


def test_training_forward_counts_once_and_eval_never_updates():
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3, mlp_only_layers=[0])
    model = BiBoForCausalLM(config)
    ids = torch.randint(0, 64, (2, 10))

    model.eval()
    before = counters(model)
    model.apply_routing_stats(model(ids).routing)
    for (b0, t0, c0), (b1, t1, c1) in zip(before, counters(model)):
        assert torch.equal(b0, b1) and torch.equal(t0, t1) and torch.equal(c0, c1)

    model.train()
    model.apply_routing_stats(model(ids).routing)
    for moe in model.moe_layers:
        assert moe.tokens_seen.item() == 20
        assert moe.expert_counts.sum().item() == 20 * config.num_experts_per_tok


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputation_does_not_count_twice(checkpointing):
    torch.manual_seed(0)
    config = tiny_config()
    model = BiBoForCausalLM(config).train()
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, labels=ids)
    out.loss.backward()  # with checkpointing this re-runs every layer's forward
    model.apply_routing_stats(out.routing)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for moe in model.moe_layers:
        assert moe.tokens_seen.item() == 20
        assert moe.expert_counts.sum().item() == 20 * config.num_experts_per_tok


def test_threshold_crossing_in_the_model_steps_the_bias():
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config(bias_update_threshold=30)).train()
    for _ in range(2):  # 2 x 20 tokens >= 30: one update, then counters reset
        model.apply_routing_stats(model(torch.randint(0, 64, (2, 10))).routing)
    u = model.config.bias_update_factor
    for moe in model.moe_layers:
        assert moe.tokens_seen.item() == 0
        steps = moe.expert_bias.abs()
        assert torch.all((steps == 0) | ((steps - u).abs() < 1e-6)), steps
        assert steps.max().item() == pytest.approx(u)


def test_counters_stay_fp32_in_a_bf16_model():
    model = BiBoForCausalLM(tiny_config()).to(torch.bfloat16)
    moe = model.moe_layers[0]
    assert moe.experts.gate_proj.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == moe.tokens_seen.dtype == moe.expert_counts.dtype == torch.float32
