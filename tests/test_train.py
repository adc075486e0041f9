"""Training on eager CPU: exact resume, crash-safe checkpoints, learning, clear errors."""

import importlib.util
import json

import pytest
import torch

from bibo_export.model import BiBoForCausalLM
from bibo_export.train import backend as backend_module
from bibo_export.train.backend import Backend, select_backend
from bibo_export.train.checkpointing import checkpoint_dirs, load_training_checkpoint
from bibo_export.train.data import make_data_source
from bibo_export.train.run import RunFolder
from bibo_export.train.trainer import TrainConfig, evaluate, requested_config, train
from helpers import run_cli, run_records, tiny_config


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(tiny_config(vocab_size=256, max_position_embeddings=64).to_json())
    return str(path)


def run_config(model_file, **overrides):
    values = dict(model_config=model_file, data="sort:4", steps=12, batch_size=8, lr=3e-3,
                  device="cpu", log_every=1, eval_every=100, checkpoint_every=3)
    values.update(overrides)
    return TrainConfig(**values)


def losses(out):
    return {r["step"]: r["loss"] for r in run_records(out) if "loss" in r}


def test_resume_continues_exactly(tmp_path, model_file):
    straight = train(run_config(model_file), tmp_path / "straight")
    train(run_config(model_file), tmp_path / "resumed", stop_after=6)
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed" / "checkpoints")][-1] == "step-000006"
    resumed = train(run_config(model_file), tmp_path / "resumed", resume=True)

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    wa = BiBoForCausalLM.from_pretrained(straight).state_dict()
    wb = BiBoForCausalLM.from_pretrained(resumed).state_dict()
    for name in wa:  # router biases and counters included
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name


def test_crash_during_checkpoint_keeps_previous(tmp_path, model_file, monkeypatch):
    out = tmp_path / "run"
    train(run_config(model_file, steps=6), out, stop_after=3)  # checkpoint step-000003
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt  # killed after writing part of the checkpoint

    monkeypatch.setattr("bibo_export.train.checkpointing.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(model_file, steps=6), out, resume=True)
    monkeypatch.undo()
    dirs = checkpoint_dirs(out / "checkpoints")
    assert [p.name for p in dirs] == ["step-000003"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    _, _, step = load_training_checkpoint(dirs[-1])
    assert step == 3
    train(run_config(model_file, steps=6), out, resume=True)  # and the run can still go on
    assert checkpoint_dirs(out / "checkpoints")[-1].name == "step-000006"


def test_training_lowers_held_out_loss(tmp_path, model_file):
    config = run_config(model_file, steps=40, batch_size=16, checkpoint_every=40)
    data = make_data_source(config.data, config.batch_size, config.seed)
    backend = select_backend("cpu")
    torch.manual_seed(config.seed)
    before = evaluate(BiBoForCausalLM(config.model_config_resolved(256)), data, backend)
    after = evaluate(BiBoForCausalLM.from_pretrained(train(config, tmp_path / "run")), data, backend)
    # A 32-wide model over 40 steps: small but real gains on a fixed, deterministic held-out set.
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["token_accuracy"] > before["token_accuracy"] + 0.01, (before, after)


def test_text_and_token_file_sources(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 200)
    (corpus / "b.txt").write_text("sorting experts " * 200)
    text = make_data_source(f"text:{corpus}", batch_size=4, seed=0, sequence_length=32)
    ids, labels = text.train_batch(0)
    assert ids.shape == labels.shape == (4, 32) and text.vocab_size == 257
    assert torch.equal(ids[:, 1:], labels[:, :-1])
    assert torch.equal(text.train_batch(5)[0], text.train_batch(5)[0])  # deterministic

    import numpy as np
    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "tokens.bin")
    packed = make_data_source(f"bin:{tmp_path / 'tokens.bin'}:uint16", 4, 0, sequence_length=16)
    ids, labels = packed.train_batch(0)
    assert packed.vocab_size == 1000
    assert torch.equal((ids + 1) % 1000, labels)
    assert sum(1 for _ in packed.eval_batches()) >= 1


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--mesh", "fsdp=two", "--device", "cpu"], "bad mesh spec 'fsdp=two'"),
    (["--data", "text:/no/such/corpus", "--device", "cpu"], "data path not found"),
    (["--resume", "--device", "cpu"], "nothing to resume"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = run_cli("train", "--out", tmp_path / "run", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_empty_corpus_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        make_data_source(f"text:{tmp_path / 'empty'}", 4, 0)


def test_fresh_run_refuses_a_folder_that_holds_one(tmp_path, model_file):
    train(run_config(model_file, steps=3), tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run"):
        train(run_config(model_file, steps=3), tmp_path / "run")


def test_set_overrides_model_fields(tmp_path, model_file):
    config = run_config(model_file, model_overrides={"num_experts_per_tok": 2})
    assert config.model_config_resolved(256).num_experts_per_tok == 2
    with pytest.raises(ValueError, match="unknown BiBoConfig key"):
        run_config(model_file, model_overrides={"experts": 2}).model_config_resolved(256)


def test_resume_keeps_the_saved_config_and_applies_only_what_was_asked(tmp_path, model_file):
    """Resuming without --steps must not fall back to TrainConfig's default schedule."""
    out = tmp_path / "run"
    train(run_config(model_file, steps=4, lr=1e-3), out, stop_after=2)
    config = requested_config(out, {"log_every": 2}, resume=True)
    assert (config.steps, config.lr, config.log_every) == (4, 1e-3, 2)
    train(config, out, resume=True)
    assert checkpoint_dirs(out / "checkpoints")[-1].name == "step-000004"
    assert json.loads((out / "train_config.json").read_text())["steps"] == 4
    with pytest.raises(ValueError, match="whose lr is 0.001"):
        train(requested_config(out, {"lr": 0.1}, resume=True), out, resume=True)


@pytest.mark.parametrize("capacity_factor, drops", [(0.25, True), (None, False)])
def test_capacity_is_an_execution_option_of_the_run(tmp_path, model_file, capacity_factor, drops):
    out = tmp_path / "run"
    final = train(run_config(model_file, steps=2, capacity_factor=capacity_factor), out)
    assert any(r.get("drop_rate", 0) > 0 for r in run_records(out)) == drops
    assert json.loads((out / "train_config.json").read_text())["capacity_factor"] == capacity_factor
    assert "capacity_factor" not in json.loads((final / "config.json").read_text())


def test_grouped_dispatch_trains_on_the_cpu_without_drops(tmp_path, model_file):
    out = tmp_path / "run"
    train(run_config(model_file, steps=2, moe_dispatch="grouped", capacity_factor=0.25), out)
    records = [r for r in run_records(out) if "drop_rate" in r]
    assert records and all(r["drop_rate"] == 0 for r in records)


@pytest.mark.parametrize("name, bf16", [("xla-cpu", False), ("xla-tpu", True), ("cuda", False)])
def test_grouped_dispatch_is_refused_where_grouped_mm_cannot_run(name, bf16):
    backend = Backend(name, torch.device("cpu"), bf16)
    with pytest.raises(ValueError, match=f"grouped runs on CUDA in bf16.*not on {name}"):
        backend.check_dispatch("grouped")
    backend.check_dispatch("index")
    Backend("cuda", torch.device("cpu"), bf16=True).check_dispatch("grouped")


def test_compile_mode_is_cuda_only_and_checked():
    cuda = Backend("cuda", torch.device("cpu"), bf16=True)
    cuda.use_compile_mode("reduce-overhead")
    assert cuda.compile_mode == "reduce-overhead"
    assert (cuda.torch_compile_mode, cuda.step_graph) == ("reduce-overhead", False)
    cuda.use_compile_mode("step-graph")
    assert (cuda.torch_compile_mode, cuda.step_graph) == (None, True)  # torch.compile's default
    cuda.use_compile_mode("default")
    assert (cuda.torch_compile_mode, cuda.step_graph) == (None, False)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        cuda.use_compile_mode("fast")
    for name in ("cpu", "xla-cpu"):
        backend = Backend(name, torch.device("cpu"), bf16=False)
        backend.use_compile_mode("default")
        for mode in ("reduce-overhead", "step-graph"):
            with pytest.raises(ValueError, match=f"applies to --device cuda .*not {name}"):
                backend.use_compile_mode(mode)


def test_legacy_checkpoint_config_still_loads(tmp_path):
    """config.json written before capacity and dispatch moved out of the model config."""
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values.update(capacity_factor=1.25, moe_dispatch="einsum")
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = BiBoForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.moe_layers[0].experts.execution.capacity_factor,
            loaded.moe_layers[0].experts.execution.dispatch) == (1.25, "einsum")


def test_run_folder_is_found_from_final_or_any_checkpoint(tmp_path, model_file):
    out = tmp_path / "run"
    final = train(run_config(model_file, steps=6), out)
    for checkpoint in (final, out / "checkpoints" / "step-000003"):
        run = RunFolder.of_checkpoint(checkpoint)
        assert run == RunFolder(out.resolve()), checkpoint
        assert run.task().lengths == (4,) and run.metrics_path.is_file()
    assert RunFolder.of_checkpoint(tmp_path) is None


@pytest.mark.parametrize("tpu, cuda, xla, pjrt, spmd, expected", [
    (True, True, True, None, False, "xla"),     # a TPU first, through XLA
    (False, True, True, None, False, "cuda"),   # then a CUDA GPU
    (False, False, True, None, False, "xla"),   # then XLA's CPU backend
    (False, False, False, None, False, "cpu"),  # eager where torch_xla is missing
    (False, True, True, "CPU", False, "xla"),   # PJRT_DEVICE asks for XLA
    (False, True, True, None, True, "xla"),     # so does a mesh
])
def test_auto_device_picks_the_best_device_present(monkeypatch, tpu, cuda, xla, pjrt, spmd,
                                                   expected):
    monkeypatch.setattr(backend_module, "default_pjrt_device", lambda: "TPU" if tpu else "CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if xla else None) if name == "torch_xla"
                        else real_find_spec(name, *a))
    if pjrt is None:
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("PJRT_DEVICE", pjrt)
    assert backend_module.auto_device(spmd) == expected
    if not spmd:  # the line make demo starts with names the same device
        pjrt_device = pjrt or ("TPU" if tpu else "CPU")
        prefix = {"xla": f"xla-{pjrt_device.lower()}", "cuda": "cuda", "cpu": "cpu"}[expected]
        assert backend_module.describe_auto_device().startswith(prefix + ":")
