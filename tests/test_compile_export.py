"""The model traces whole: torch.export of inference, torch.compile(fullgraph) of training."""

import pytest
import torch

from bibo_export.config import ExecutionOptions
from bibo_export.model import BiBoForCausalLM
from helpers import tiny_config


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids).logits


@pytest.mark.parametrize("dispatch", ["index", "einsum", "dense"])
def test_torch_export_of_eval_forward(dispatch):
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config(), ExecutionOptions(1.5, dispatch)).eval()
    ids = torch.randint(0, 64, (2, 12))
    exported = torch.export.export(LogitsOnly(model), (ids,))
    with torch.no_grad():
        assert (exported.module()(ids) - model(ids).logits).abs().max() <= 1e-5


def test_torch_export_of_the_model_as_users_hold_it():
    """Its output (CausalLMOutput, with RoutingStats inside) is a pytree node: no wrapper."""
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 64, (2, 12))
    exported = torch.export.export(model, (ids,))
    with torch.no_grad():
        got, want = exported.module()(ids), model(ids)
    assert (got.logits - want.logits).abs().max() <= 1e-5
    assert len(got.routing) == len(model.moe_layers)
    assert got.routing[0].num_tokens == 24
    assert torch.equal(got.routing[0].expert_counts, want.routing[0].expert_counts)


def test_torch_export_of_cached_decode_step():
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).eval()

    class DecodeStep(torch.nn.Module):
        def forward(self, ids, cache, start_pos):
            out = model(ids, cache=cache, start_pos=start_pos)
            return out.logits, out.cache

    cache = model.new_cache(1, 16)
    args = (torch.randint(0, 64, (1, 1)), cache, torch.tensor(3))
    exported = torch.export.export(DecodeStep(), args)
    logits, new_cache = exported.module()(*args)
    with torch.no_grad():
        expected = model(args[0], cache=cache, start_pos=3)
    assert (logits - expected.logits).abs().max() <= 1e-5
    assert torch.equal(new_cache[1]["key"], expected.cache[1]["key"])


# index in fp32; grouped in bf16 under autocast, as CUDA trains it (the graph of
# torch._grouped_mm takes bf16 only), to bf16's rounding of each gradient's scale.
@pytest.mark.parametrize("execution, autocast, tolerance", [
    (ExecutionOptions(capacity_factor=1.25), False, 1e-4),
    (ExecutionOptions(dispatch="grouped"), True, 1e-2)], ids=["index", "grouped-bf16"])
def test_torch_compile_fullgraph_forward_backward(execution, autocast, tolerance):
    """Dynamo captures forward and backward as one graph, and the graph after inductor's
    decompositions and its forward/backward partition computes eager's loss and gradients.

    The backend is ``aot_eager_decomp_partition``: inductor's decompositions and partitioner
    without its code generation, whose CPU form (C++ through g++) is not what CUDA runs
    (Triton) and took 70-140 s on a cold cache per environment here (2026-11-27), against
    6-12 s without it.
    """
    torch.manual_seed(0)
    # Two layers: one dense, one MoE.
    config = tiny_config(num_hidden_layers=2)
    model = BiBoForCausalLM(config, execution).train()
    ids = torch.randint(0, 64, (2, 16))

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(model)
    compiled = torch.compile(model, backend="aot_eager_decomp_partition", fullgraph=True)
    compiled_loss, compiled_grads = loss_and_grads(compiled)
    assert (compiled_loss - eager_loss).abs() <= 1e-5
    for name, grad in eager_grads.items():
        scale = grad.abs().max() if autocast else 1.0
        assert (compiled_grads[name] - grad).abs().max() <= tolerance * scale, name
