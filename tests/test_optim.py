"""The train step's gradient clipping inside the fused AdamW equals clip_grad_norm_ followed by
the per-parameter AdamW (the XLA path, and torch's reference formulation)."""

import pytest
import torch

from bibo_export.model import BiBoForCausalLM
from bibo_export.train.optim import build_optimizer, initialize_state
from bibo_export.train.step import TrainStep
from helpers import tiny_config


def trained_weights(grad_clip: float, fused: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).train()
    lr = torch.tensor(1e-2)
    optimizer = build_optimizer(model, lr, 0.01, "cpu")
    if not fused:
        optimizer.defaults["fused"] = False
        for group in optimizer.param_groups:
            group["fused"] = False
    step = TrainStep(model, optimizer, lr, torch.zeros(()), lambda _: lr, grad_clip=grad_clip)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (1, 4, 9), generator=generator)
        metrics = step(ids, ids)
    assert metrics["grad_norm"] > 0
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3], ids=["clipping", "not-clipping"])
def test_clipping_in_the_fused_update_equals_clip_grad_norm(grad_clip):
    """To 1e-5, a thousandth of a step's update at lr 1e-2: the fused and per-parameter AdamW
    kernels alone differ by up to 2e-6 after two steps (Adam divides by √v, which magnifies
    rounding where gradients are small)."""
    fused, reference = trained_weights(grad_clip, True), trained_weights(grad_clip, False)
    for name, value in reference.items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-5, msg=name)


def test_clipping_changes_the_update():
    """The comparison above can fail: the clip bound does reach the weights."""
    clipped, free = trained_weights(1e-3, True), trained_weights(1e3, True)
    differs = [(clipped[n] - free[n]).abs().max() > 1e-4 for n in free if "weight" in n]
    assert any(differs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-parameter"])
def test_initialized_state_changes_no_weight_and_no_later_step(fused):
    """initialize_state makes the state before the first step (one XLA graph for every step);
    the oracle is the same optimizer making its state in its first step, as torch does."""
    def steps(initialize: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = BiBoForCausalLM(tiny_config()).train()
        lr = torch.tensor(1e-2)
        optimizer = build_optimizer(model, lr, 0.01, "cpu")
        optimizer.defaults["fused"] = fused
        for group in optimizer.param_groups:
            group["fused"] = fused
        untouched = {name: value.clone() for name, value in model.state_dict().items()}
        if initialize:
            initialize_state(optimizer)
            assert all(torch.equal(untouched[name], value)
                       for name, value in model.state_dict().items())
            assert all(p.grad is None for p in model.parameters())
        step = TrainStep(model, optimizer, lr, torch.zeros(()), lambda _: lr, grad_clip=1.0)
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            ids = torch.randint(0, 64, (1, 4, 9), generator=generator)
            step(ids, ids)
        state = {f"{i}.{key}": value for i, p in enumerate(model.parameters())
                 for key, value in optimizer.state[p].items()}
        return model.state_dict(), state

    (weights, state), (oracle_weights, oracle_state) = steps(True), steps(False)
    assert weights.keys() == oracle_weights.keys() and state.keys() == oracle_state.keys()
    assert all(torch.equal(weights[name], oracle_weights[name]) for name in weights)
    assert all(torch.equal(state[key], oracle_state[key]) for key in state)
