"""save_pretrained / from_pretrained: the contract between training and export."""

import json

import pytest
import torch

from bibo_export.model import BiBoForCausalLM, CheckpointError
from helpers import tiny_config


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config())
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.expert_bias.normal_()
            moe.tokens_seen.fill_(17)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_keeps_weights_buffers_and_outputs(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = BiBoForCausalLM.from_pretrained(path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_tied_embeddings_round_trip(tmp_path):
    model = BiBoForCausalLM(tiny_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    loaded = BiBoForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not found"):
        BiBoForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        BiBoForCausalLM.from_pretrained(tmp_path)
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        BiBoForCausalLM.from_pretrained(path)


def test_truncated_weights_are_reported_as_corrupt(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        BiBoForCausalLM.from_pretrained(path)


def test_config_that_does_not_match_the_weights(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["moe_intermediate_size"] = 40
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        BiBoForCausalLM.from_pretrained(path)
    config["num_hidden_layers"] = 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        BiBoForCausalLM.from_pretrained(path)


def test_unknown_config_key(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["flash"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown BiBoConfig key.*flash"):
        BiBoForCausalLM.from_pretrained(path)


def test_failed_save_leaves_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        with open(args[1], "wb") as f:  # a partial write, then the crash
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("bibo_export.model.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    BiBoForCausalLM.from_pretrained(path)
