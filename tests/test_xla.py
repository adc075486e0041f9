"""The training step on torch_xla (XLA CPU backend here): one graph, no CPU fallbacks."""

import pytest
import torch

from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.train.step import train_step

pytestmark = pytest.mark.xla  # collected everywhere, selected only in .venv-xla (make test-xla)


@pytest.fixture
def xla():
    import torch_xla
    import torch_xla.debug.metrics

    return torch_xla


def compile_count(xla):
    return xla.debug.metrics.metric_data("CompileTime")[0]


def fallbacks(xla):
    return [n for n in xla.debug.metrics.counter_names() if n.startswith("aten::")]


def test_train_steps_compile_once_without_fallbacks(xla):
    device = xla.device()
    torch.manual_seed(0)
    config = BiBoConfig.preset("sort-tiny", capacity_factor=1.25)
    model = BiBoForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step = xla.compile(train_step, full_graph=True)
    xla.debug.metrics.clear_all()
    counts, losses = [], []
    for _ in range(8):  # 8 x 256 tokens crosses the 800-token bias threshold twice
        ids = torch.randint(0, 255, (8, 32)).to(device)
        losses.append(step(model, optimizer, ids, ids))
        xla.sync()
        counts.append(compile_count(xla))
    assert counts[2:] == [counts[1]] * 6, f"recompiled: {counts}"
    assert fallbacks(xla) == []
    assert all(torch.isfinite(loss.cpu()) for loss in losses)
    bias = model.moe_layers[0].expert_bias.cpu()
    assert bias.abs().max().item() > 0  # the in-graph bias update ran


def test_xla_forward_matches_cpu(xla):
    torch.manual_seed(0)
    model = BiBoForCausalLM(BiBoConfig.preset("sort-tiny")).eval()
    ids = torch.randint(0, 255, (2, 24))
    with torch.no_grad():
        cpu = model(ids).logits
        on_xla = model.to(xla.device())(ids.to(xla.device())).logits.cpu()
    assert (on_xla - cpu).abs().max() <= 1e-4
