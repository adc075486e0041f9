"""Nothing of the user's is lost: publishing is atomic at every instant (a kill at any step
leaves the old or the new artifact whole), two writers of one folder end with one winner, a
full disk and a failing program are one line, and what a command replaces it says."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_config

from bibo_export import cli, io
from bibo_export.config import PRESETS, BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.resources import parameter_count
from bibo_export.verdict import judge

KILLED = 77


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def hidden_temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def publish_model(model: BiBoForCausalLM, out: Path) -> None:
    """What every publisher does: write a folder under a temporary name, then publish it."""
    with io.atomic_directory(out) as folder:
        model.save_pretrained(folder)


def killed_publish(model: BiBoForCausalLM, out: Path, kill_at: int) -> int:
    """Publish in a forked child that dies (``os._exit``, no clean-up runs) just before or
    just after its ``kill_at``-th file-system step; the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child: count every step that writes, renames or removes
        steps = iter(range(10**6))

        def killing(function):
            def step(*args, **kwargs):
                if next(steps) == kill_at:
                    os._exit(KILLED)
                result = function(*args, **kwargs)
                if next(steps) == kill_at:
                    os._exit(KILLED)
                return result
            return step

        import bibo_export.model.checkpoint as checkpoint
        checkpoint.save_file = killing(checkpoint.save_file)
        io.rename2 = killing(io.rename2)
        os.replace = killing(os.replace)
        shutil.rmtree = killing(shutil.rmtree)
        Path.write_text = killing(Path.write_text)
        try:
            publish_model(model, out)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_kill_at_any_step_of_a_publish_leaves_the_old_or_the_new_artifact_whole(tmp_path):
    """Every kill point of a publish over an existing checkpoint, in turn: the folder always
    loads, as exactly the old model or the new one, and the next publish removes what the
    killed one left beside it."""
    torch.manual_seed(0)
    old, new = BiBoForCausalLM(tiny_config()), BiBoForCausalLM(tiny_config())
    out = tmp_path / "ckpt"
    publish_model(old, out)
    seen, kill_at = set(), 0
    while (status := killed_publish(new, out, kill_at)) == KILLED:
        loaded = BiBoForCausalLM.from_pretrained(out)  # complete: it loads
        weights = loaded.lm_head.weight
        is_old = torch.equal(weights, old.lm_head.weight)
        assert is_old or torch.equal(weights, new.lm_head.weight), kill_at
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        seen.add("old" if is_old else "new")
        publish_model(old, out)  # the next run: it clears the dead writer's temporaries
        assert hidden_temporaries(out) == [], kill_at
        kill_at += 1
    assert status == 0 and kill_at >= 6, (status, kill_at)
    assert seen == {"old", "new"}  # kills fell on both sides of the exchange


def test_publishing_exchanges_the_folder_in_one_step(tmp_path, monkeypatch):
    """Over an existing folder the new one arrives by one RENAME_EXCHANGE, not two renames."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    renames = []
    real = io.rename2
    monkeypatch.setattr(io, "rename2", lambda a, b, flags: renames.append(flags) or real(a, b,
                                                                                          flags))
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("a plain rename in a publish"))
    with io.atomic_directory(out) as folder:
        (folder / "new.txt").write_text("new")
    assert renames == [io.RENAME_NOREPLACE, io.RENAME_EXCHANGE]  # refused, then exchanged
    assert [p.name for p in out.iterdir()] == ["new.txt"] and hidden_temporaries(out) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user-files") / "ckpt"
    torch.manual_seed(0)
    BiBoForCausalLM(tiny_config(num_hidden_layers=2, max_position_embeddings=32)) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def onnx_export(checkpoint: Path) -> Path:
    """An ONNX export of ``checkpoint`` made once, which tests copy where an earlier export
    should already be: a folder holding ``fp32/``."""
    out = checkpoint.parent / "onnx"
    run_cli("export", "onnx", "--checkpoint", checkpoint, "--out", out, check=True)
    return out


@pytest.mark.export  # exports need onnx / executorch (the export env)
def test_two_writers_of_one_folder_one_wins_whole_the_other_ends_in_one_line(checkpoint,
                                                                           tmp_path):
    out = tmp_path / "onnx"
    command = [sys.executable, "-m", "bibo_export.cli", "export", "onnx", "--checkpoint",
               str(checkpoint), "--out", str(out)]
    writers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    results = [subprocess.CompletedProcess(command, w.wait(timeout=300), *w.communicate())
               for w in writers]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode)
    one_error_line(loser, "is being written by another bibo-export process")
    run_cli("generate", "--model", out / "fp32", "--prompt-ids", "3,4", check=True)  # it loads
    assert hidden_temporaries(out / "fp32") == []


@pytest.mark.export  # exports need onnx / executorch (the export env)
def test_an_export_replaces_its_own_kind_and_says_so_and_overwrite_takes_a_foreign_folder(
        checkpoint, onnx_export, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(onnx_export, out)
    again = run_cli("export", "onnx", "--checkpoint", checkpoint, "--out", out, check=True)
    assert f"replacing an ONNX export in {out / 'fp32'}\n" in again.stdout
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's notes, which the tokenizer may learn from " * 50)
    tokenizer = ("tokenizer", "train", "--data", f"text:{tmp_path / 'corpus.txt'}",
                 "--vocab-size", 260, "--out", mine)
    shutil.copy(mine / "notes.txt", tmp_path / "corpus.txt")
    assert run_cli(*tokenizer).returncode == 2 and (mine / "notes.txt").is_file()
    forced = run_cli(*tokenizer, "--overwrite", check=True)
    assert f"--overwrite: replacing {mine}" in forced.stdout
    assert [p.name for p in mine.iterdir()] == ["tokenizer.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs (root only; elsewhere the test skips and says why)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.export  # exports need onnx / executorch (the export env)
def test_a_full_disk_is_one_line_and_keeps_the_previous_export(checkpoint, onnx_export,
                                                               small_disk):
    """The first export fits; the second, which needs room for both while it publishes, does
    not: one line naming the output, the first export byte-identical, no temporaries left."""
    out = small_disk / "onnx"
    shutil.copytree(onnx_export, out)
    before = snapshot(out)
    result = run_cli("export", "onnx", "--checkpoint", checkpoint, "--out", out)
    one_error_line(result, f"no space left on the device while writing {out / 'fp32'}")
    assert snapshot(out) == before and hidden_temporaries(out / "fp32") == []


def test_a_full_disk_during_training_is_one_line(small_disk, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(tiny_config(vocab_size=256, hidden_size=128, intermediate_size=256,
                                  moe_intermediate_size=128).to_json())
    out = small_disk / "run"
    result = run_cli("train", "--config", config, "--data", "sort:4", "--steps", 2,
                     "--batch-size", 4, "--device", "cpu", "--out", out)
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # not the bar
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"no space left on the device while writing {out}/checkpoints/step-" in errors[0]
    assert not any(p.name.endswith(".tmp") for p in small_disk.rglob("*"))


@pytest.mark.export  # exports need onnx / executorch (the export env)
def test_a_program_with_a_flipped_byte_is_one_line_in_generate_and_parity(trained_export,
                                                                         tmp_path):
    checkpoint, _, folder, _ = trained_export("executorch", "fp32")
    program = bytearray((folder / "model.pte").read_bytes())
    program[200] ^= 0xFF  # inside the program's flatbuffer, past its file identifier
    flipped = tmp_path / "flipped.pte"
    flipped.write_bytes(bytes(program))
    for result in (run_cli("generate", "--model", flipped, "--prompt-ids", "3,4"),
                   run_cli("parity", "--checkpoint", checkpoint, "--no-speed", flipped)):
        one_error_line(result, f"ExecuTorch could not load {flipped}")
        assert "re-export it" in result.stderr


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_log(capsys, monkeypatch):
    def broken(args: argparse.Namespace) -> None:
        raise KeyError("a bug")

    args = argparse.Namespace(command="info", func=broken)
    assert cli.run_command(args) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "unexpected KeyError: 'a bug'" in line, line
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "a bug" in log.read_text()
    log.unlink()
    monkeypatch.setenv("BIBO_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.run_command(args)


@pytest.mark.parametrize("scope", ["export", "task"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_non_finite_logits_fail_every_scope_and_precision(scope, precision):
    row = {"max_abs": float("nan"), "top1_agreement": 1.0, "cosine": float("nan"),
           "greedy_match": True, "integer_kernels": 10}
    assert judge(row, "onnx", precision, scope) == ["non-finite logits (NaN or Inf)"]
    assert judge({**row, "max_abs": float("inf"), "cosine": 1.0}, "onnx", precision, scope)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": True}, {"router_type": "mlp", "use_ssmax": False},
    {"attention_bias": True, "mlp_only_layers": [0, 2]}, {"num_key_value_heads": 1}])
def test_the_memory_estimate_counts_the_models_parameters(overrides):
    config = tiny_config(**overrides)
    assert parameter_count(config) == BiBoForCausalLM(config).num_parameters()


def test_the_memory_estimate_counts_the_presets_parameters():
    for name in PRESETS:
        config = BiBoConfig.preset(name)
        with torch.device("meta"):
            model = BiBoForCausalLM(config)
        assert parameter_count(config) == model.num_parameters(), name


def test_train_overwrite_starts_a_finished_run_over(tmp_path):
    config = tmp_path / "model.json"
    config.write_text(tiny_config(vocab_size=256).to_json())
    train = ("train", "--config", config, "--data", "sort:4", "--steps", 2, "--batch-size", 4,
             "--device", "cpu", "--out", tmp_path / "run")
    run_cli(*train, check=True)
    (tmp_path / "run" / "stale.txt").write_text("from before")
    assert run_cli(*train).returncode == 2  # a trained run is kept without --overwrite
    result = run_cli(*train, "--overwrite", check=True)
    assert f"--overwrite: replacing {tmp_path / 'run'}" in result.stdout
    assert not (tmp_path / "run" / "stale.txt").exists()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
