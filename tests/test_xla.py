"""Training through torch_xla (its CPU backend here): one graph per shape, no CPU fallbacks.
The SPMD meshes are in test_xla_spmd.py, so the two files run on different pytest-xdist
workers."""

import pytest
import torch

from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.train.trainer import TrainConfig, train
from helpers import run_records

pytestmark = pytest.mark.xla  # collected everywhere, selected only in .venv-xla (make test-xla)


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.01])
def test_real_train_step_compiles_once_without_fallbacks(tmp_path, aux_loss_coef):
    # sort-tiny's widths on two layers, its dense one and a MoE one: every op the step has, in
    # three quarters of the time of three layers (35 vs 47 s for both cases, 2026-11-27).
    config = TrainConfig(preset="sort-tiny", data="sort:8", steps=10, batch_size=8,
                         device="xla", log_every=1, eval_every=10, checkpoint_every=10,
                         model_overrides={"num_hidden_layers": 2, "aux_loss_coef": aux_loss_coef})
    final = train(config, tmp_path)
    steps = [r for r in run_records(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    compiles = [r["xla_compiles"] for r in steps]
    # The optimizer's state exists before the first step (initialize_state), so the first step
    # compiles the graph that every later step runs.
    assert compiles[1:] == [compiles[0]] * 9, f"recompiled after the first step: {compiles}"
    assert all(r["cpu_fallbacks"] == [] for r in steps), steps[-1]["cpu_fallbacks"]
    assert all(("aux_loss" in r) == (aux_loss_coef > 0) for r in steps)
    lrs = [r["lr"] for r in steps]  # 1 warm-up step, then cosine: it moves, in the same graph
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])), lrs
    # 10 x 128 tokens cross the 800-token threshold: the in-graph bias update ran.
    model = BiBoForCausalLM.from_pretrained(final)
    assert model.moe_layers[0].expert_bias.abs().max().item() > 0


def test_xla_forward_matches_cpu():
    import torch_xla

    torch.manual_seed(0)
    model = BiBoForCausalLM(BiBoConfig.preset("sort-tiny")).eval()
    ids = torch.randint(0, 255, (2, 24))
    with torch.no_grad():
        cpu = model(ids).logits
        on_xla = model.to(torch_xla.device())(ids.to(torch_xla.device())).logits.cpu()
    assert (on_xla - cpu).abs().max() <= 1e-4
