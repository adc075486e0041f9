"""The optional auxiliary load-balancing loss: its value, its gradients, and its global batch
(gradient accumulation included). XLA and SPMD are checked in test_xla.py."""

import math

import pytest
import torch

from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.model.moe import balance_loss, normalize_logits
from bibo_export.train.optim import build_optimizer
from bibo_export.train.step import TrainStep
from helpers import tiny_config


def test_hand_computed_loss():
    counts = torch.tensor([[2.0, 0.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]])  # two MoE layers, n = 4
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    # layer 0: f = (.25, 0, .25, .5), Σ f P = .025 + .075 + .2 = .3; layer 1: Σ f P = .25
    assert balance_loss(counts, probs, 0.01).item() == pytest.approx(0.01 * 4 * (0.3 + 0.25) / 2)


def test_model_statistics_give_f_and_p_of_its_routing():
    """f and P from a forward's RoutingStats equal f and P computed from the router's logits
    by hand (softmax of the normalised logits, biased top-k)."""
    torch.manual_seed(0)
    config = tiny_config(router_type="mlp", num_hidden_layers=2, mlp_only_layers=[0])
    model = BiBoForCausalLM(config).eval()
    moe = model.moe_layers[0]
    with torch.no_grad():
        moe.expert_bias.normal_(std=0.5)
    captured = {}
    moe.register_forward_pre_hook(lambda module, args: captured.update(u=args[0]))
    out = model(torch.randint(0, 64, (2, 9)))
    u = captured["u"].reshape(18, -1).double()
    logits = u @ moe.router.weight.double().t()
    z = normalize_logits(logits, config.router_lambda)
    probs = torch.softmax(z, -1)
    chosen = torch.topk(z + moe.expert_bias.double(), config.num_experts_per_tok).indices
    counts = torch.zeros(config.num_routed_experts, dtype=torch.float64).scatter_add(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=torch.float64))
    stats = out.routing[0]
    assert torch.equal(stats.expert_counts.double(), counts)
    assert torch.allclose(stats.probs_sum.double() / stats.num_tokens, probs.mean(0), atol=1e-6)
    want = 0.1 * config.num_routed_experts * (counts / counts.sum() * probs.mean(0)).sum()
    got = balance_loss(stats.expert_counts[None], stats.probs_sum[None] / 18, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradients_reach_the_router():
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config(router_type="mlp")).train()
    out = model(torch.randint(0, 64, (2, 9)))
    counts = torch.stack([s.expert_counts for s in out.routing])
    probs = torch.stack([s.probs_sum for s in out.routing]) / out.routing[0].num_tokens
    balance_loss(counts, probs, 0.01).backward()
    for moe in model.moe_layers:
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def train_step(config: BiBoConfig) -> TrainStep:
    torch.manual_seed(0)
    model = BiBoForCausalLM(config).train()
    lr = torch.tensor(1e-3)
    optimizer = build_optimizer(model, lr, 0.0, "cpu")
    return TrainStep(model, optimizer, lr, torch.zeros(()), lambda step: lr, grad_clip=1.0)


def test_accumulated_micro_batches_see_the_global_batch():
    """With 2 micro-batches the step reports the loss of f and P over all of its tokens: the
    same number one micro-batch of both halves gives."""
    config = tiny_config(aux_loss_coef=0.01, bias_update_threshold=10**6)
    ids = torch.randint(0, 64, (2, 4, 9))
    split = train_step(config)(ids, ids)
    whole = train_step(config)(ids.reshape(1, 8, 9), ids.reshape(1, 8, 9))
    assert split["aux_loss"].item() == pytest.approx(whole["aux_loss"].item(), rel=1e-5)
    assert 0.01 <= whole["aux_loss"].item() <= 0.01 * config.num_routed_experts


def test_off_by_default_and_refused_when_not_finite():
    config = tiny_config()
    assert config.aux_loss_coef == 0
    ids = torch.randint(0, 64, (1, 2, 9))
    assert "aux_loss" not in train_step(config)(ids, ids)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        tiny_config(aux_loss_coef=math.nan)


@pytest.mark.export  # torch 2.13's compiler, what `train --device cuda` runs
def test_compiled_micro_batch_trains_as_the_eager_step():
    """On CUDA the step compiles its micro-batch forward through the loss (Backend.compile_step),
    so the logits never leave the graph. Compiled as one graph (aot_eager: the same graph
    capture, runnable on CPU), two steps with the auxiliary loss on give the eager step's
    metrics and weights."""
    config = tiny_config(aux_loss_coef=0.01, bias_update_threshold=10)
    ids = torch.randint(0, 64, (2, 4, 9), generator=torch.Generator().manual_seed(1))
    eager, compiled = train_step(config), train_step(config)
    compiled.micro_batch = torch.compile(compiled.micro_batch, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        expected, got = eager(ids, ids), compiled(ids, ids)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
