"""Training through torch_xla (its CPU backend here): one graph per shape, no CPU fallbacks,
and SPMD meshes that reproduce the single-device losses."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.train.trainer import TrainConfig, train
from helpers import tiny_config

pytestmark = pytest.mark.xla  # collected everywhere, selected only in .venv-xla (make test-xla)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.01])
def test_real_train_step_compiles_once_without_fallbacks(tmp_path, aux_loss_coef):
    config = TrainConfig(preset="sort-tiny", data="sort:8", steps=10, batch_size=8,
                         device="xla", log_every=1, eval_every=10, checkpoint_every=10,
                         model_overrides={"aux_loss_coef": aux_loss_coef})
    final = train(config, tmp_path)
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    compiles = [r["xla_compiles"] for r in steps]
    assert compiles[2:] == [compiles[1]] * 8, f"recompiled after warm-up: {compiles}"
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


def train_subprocess(tmp_path, name, mesh=None):
    """SPMD must be switched on before any XLA tensor exists, so each run is its own process.
    The auxiliary balance loss is on: its f and P must cover every device's tokens."""
    config = tmp_path / "tiny.json"
    config.write_text(tiny_config(vocab_size=256, max_position_embeddings=64).to_json())
    out = tmp_path / name
    args = [sys.executable, "-m", "bibo_export.cli", "train", "--config", str(config),
            "--data", "sort:4", "--steps", "5", "--batch-size", "8", "--log-every", "1",
            "--eval-every", "100", "--checkpoint-every", "100", "--set", "aux_loss_coef=0.01",
            "--out", str(out)]
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    result = subprocess.run(args + (["--mesh", mesh] if mesh else []), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return [(r["loss"], r["aux_loss"]) for r in records(out) if "loss" in r]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    return train_subprocess(tmp_path_factory.mktemp("spmd"), "single")


@pytest.mark.parametrize("mesh", ["fsdp=4", "data=2,fsdp=2", "fsdp=2,expert=2"])
def test_spmd_mesh_reproduces_single_device_losses(tmp_path, mesh, single_device_losses):
    losses = train_subprocess(tmp_path, "mesh", mesh)
    assert len(losses) == len(single_device_losses) == 5
    for got, want in zip(losses, single_device_losses):  # (loss, aux_loss) per step
        assert abs(got[0] - want[0]) <= 1e-4 * abs(want[0]), (mesh, losses, single_device_losses)
        assert abs(got[1] - want[1]) <= 1e-4 * abs(want[1]), (mesh, losses, single_device_losses)
