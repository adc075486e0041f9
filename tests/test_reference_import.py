"""Checkpoints written by the original BiBo code import through the CLI and compute the logits
the original computed (fixtures made by that code: tests/fixtures/reference-bibo, whose README says
how they were made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bibo_export.model import BiBoForCausalLM
from bibo_export.model.reference import INDEX_FILE, import_reference
from helpers import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference-bibo"
NAMES = ["mlp_ssmax0", "conv_ssmax0", "mlp_ssmax1", "conv_ssmax1"]
TOL = 1e-4  # the bar for an imported checkpoint (docs/parity.md)


@pytest.fixture(scope="module")
def fixtures() -> Path:
    assert FIXTURES.is_dir(), f"the reference fixtures are missing: {FIXTURES}"
    return FIXTURES


@pytest.mark.parametrize("name", NAMES)
def test_imported_checkpoint_computes_the_originals_logits(fixtures, tmp_path, name):
    result = run_cli("import", "reference", str(fixtures / name), "--out", str(tmp_path / name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported {fixtures / name} -> ")
    model = BiBoForCausalLM.from_pretrained(tmp_path / name).eval()
    expected = np.load(fixtures / f"{name}.npz")
    ids = torch.from_numpy(expected["ids"])
    with torch.no_grad():
        first = model(ids[:, :1]).logits.numpy()
        full = model(ids).logits.numpy()
    assert np.abs(first - expected["first_logits"]).max() <= TOL
    if not model.config.use_ssmax:  # SSMax's definitions agree on every position only then
        assert np.abs(full - expected["logits"]).max() <= TOL
    else:  # and differ beyond the first token (the original scales by the call's length)
        assert np.abs(full - expected["logits"]).max() > TOL


def test_a_sharded_checkpoint_imports_to_the_same_model(fixtures, tmp_path):
    source = tmp_path / "sharded"
    source.mkdir()
    shutil.copy(fixtures / "conv_ssmax1" / "config.json", source)
    tensors = load_file(str(fixtures / "conv_ssmax1" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(source / file))
    (source / INDEX_FILE).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    sharded = import_reference(source, tmp_path / "from-shards").state_dict()
    single = import_reference(fixtures / "conv_ssmax1", tmp_path / "from-one").state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def mutate_config(folder: Path, **changes) -> None:
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, **changes}))


def mutate_tensors(folder: Path, change) -> None:  # noqa: ANN001 - dict -> dict
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(change(tensors), str(folder / "model.safetensors"))


def renamed(tensors: dict) -> dict:
    tensors["model.layers.1.mlp.gate.router_proj.weight"] = tensors.pop(
        "model.layers.1.mlp.gate.gate_proj.weight")
    return tensors


def reshaped(tensors: dict) -> dict:
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 128)
    return tensors


def dropped(tensors: dict) -> dict:
    del tensors["model.layers.2.mlp.routed_experts.3.up_proj.weight"]
    return tensors


MUTATIONS = {
    "renamed tensor": (lambda f: mutate_tensors(f, renamed),
                       "unknown tensor model.layers.1.mlp.gate.router_proj.weight"),
    "wrong shape": (lambda f: mutate_tensors(f, reshaped),
                    "layers.2.self_attn.q_proj.weight has shape (64, 128)"),
    "missing expert": (lambda f: mutate_tensors(f, dropped),
                       "layer 2 has up_proj for routed experts [0, 1, 2, 4]"),
    "key with a function": (lambda f: mutate_config(f, sliding_window=128),
                            "unknown BiBoConfig key(s): sliding_window"),
    "layer norm": (lambda f: mutate_config(f, layer_norm_type="layer"),
                   "layer_norm_type is 'layer': only RMSNorm is implemented"),
    "attention dropout": (lambda f: mutate_config(f, attention_dropout=0.1),
                          "attention dropout is not implemented"),
    "foreign model type": (lambda f: mutate_config(f, model_type="llama"),
                           "model_type is 'llama': not a BiBo checkpoint"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]), "corrupt or truncated"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_checkpoint_is_one_line_and_writes_nothing(fixtures, tmp_path, mutation):
    source = shutil.copytree(fixtures / "mlp_ssmax0", tmp_path / "source")
    mutate, message = MUTATIONS[mutation]
    mutate(source)
    result = run_cli("import", "reference", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, \
        result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no temporary left


def test_an_absurd_layer_count_is_refused_at_once(fixtures, tmp_path):
    """A config.json that names far more layers than its weights hold is refused before a
    model of that many layers is built (which took a minute), in one line."""
    source = tmp_path / "source"
    shutil.copytree(fixtures / "conv_ssmax1", source)
    values = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**values, "num_hidden_layers": 1_000_000}))
    result = run_cli("import", "reference", source, "--out", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "num_hidden_layers=1000000 but the weights hold layers 0..3" in lines[0]
    assert not (tmp_path / "out").exists()
