"""SPMD training through torch_xla on 4 virtual CPU devices: meshes reproduce the losses and
auxiliary losses of the same run on one device, and compile no graph after the first step."""

import os

import pytest

from helpers import run_cli, run_records, tiny_config

pytestmark = pytest.mark.xla  # collected everywhere, selected only in .venv-xla (make test-xla)


def train(tmp_path, name: str, mesh: str | None = None) -> list[tuple[float, float]]:
    """(loss, auxiliary loss) of each of 5 training steps of a tiny model: on 4 XLA CPU devices
    with ``mesh``, or eagerly on the CPU without one. The auxiliary balance loss is on: its f and
    P must cover every device's tokens."""
    config = tmp_path / "tiny.json"
    config.write_text(tiny_config(vocab_size=256, max_position_embeddings=64,
                                  num_hidden_layers=2).to_json())  # one dense, one MoE layer
    out = tmp_path / name
    args = ["train", "--config", config, "--data", "sort:4", "--steps", 5, "--batch-size", 8,
            "--log-every", 1, "--eval-every", 100, "--checkpoint-every", 100, "--set",
            "aux_loss_coef=0.01", "--out", out]
    if mesh is None:
        run_cli(*args, "--device", "cpu", check=True)
    else:  # SPMD is switched on before any XLA tensor exists: an interpreter of its own
        run_cli(*args, "--mesh", mesh, check=True,
                env={**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})
    records = [r for r in run_records(out) if "loss" in r]
    if mesh is not None:  # the first step compiles the graph that every later step runs
        compiles = [r["xla_compiles"] for r in records]
        assert compiles[1:] == [compiles[0]] * (len(compiles) - 1), (mesh, compiles)
    return [(r["loss"], r["aux_loss"]) for r in records]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    """The oracle: the same run in eager PyTorch on one CPU device (it equals torch_xla's
    single-device run to about 1e-6)."""
    return train(tmp_path_factory.mktemp("spmd"), "single")


@pytest.mark.parametrize("mesh", ["fsdp=4", "data=2,fsdp=2", "fsdp=2,expert=2"])
def test_spmd_mesh_reproduces_single_device_losses(tmp_path, mesh, single_device_losses):
    losses = train(tmp_path, "mesh", mesh)
    assert len(losses) == len(single_device_losses) == 5
    for got, want in zip(losses, single_device_losses):  # (loss, aux_loss) per step
        assert abs(got[0] - want[0]) <= 1e-4 * abs(want[0]), (mesh, losses, single_device_losses)
        assert abs(got[1] - want[1]) <= 1e-4 * abs(want[1]), (mesh, losses, single_device_losses)
