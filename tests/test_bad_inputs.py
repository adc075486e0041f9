"""Bad input through the command line, as a new user would type it: each case must print one
line on stderr naming the problem, exit non-zero without a traceback, and write nothing under
the output name it was given (or leave what was there untouched)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_config

from bibo_export.export.onnx import export_onnx
from bibo_export.model import BiBoForCausalLM

MAX_LENGTH = 32


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its hash ({} when nothing is there)."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class Planted:
    """Unpickling this runs ``touch PATH``: what a hostile optimizer.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """What the cases point at: a checkpoint, a 2-step run, an ONNX export, a text corpus and
    a few damaged or hostile files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    config = tiny_config(vocab_size=256, num_hidden_layers=2, max_position_embeddings=64)
    (root / "model.json").write_text(config.to_json())
    torch.manual_seed(0)
    BiBoForCausalLM(config).save_pretrained(root / "ckpt")
    export_onnx(root / "ckpt", {"fp32": root / "exports" / "fp32"}, max_length=MAX_LENGTH)

    run = root / "run"
    run_cli("train", "--config", root / "model.json", "--data", "sort:4", "--steps", 2,
            "--batch-size", 4, "--device", "cpu", "--out", run, "--checkpoint-every", 1,
            "--eval-every", 2, check=True)
    hostile = root / "hostile-run"
    subprocess.run(["cp", "-r", str(run), str(hostile)], check=True)
    latest = sorted((hostile / "checkpoints").iterdir())[-1]
    torch.save({"optimizer": Planted(root / "pwned"), "torch_rng": torch.get_rng_state()},
               latest / "optimizer.pt", pickle_protocol=2)

    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("a small corpus for bad inputs " * 2000)
    run_cli("tokenizer", "train", "--data", f"text:{root / 'corpus'}", "--vocab-size", 300,
            "--out", root / "tokenizer", check=True)
    (root / "bad.json").write_text(json.dumps({"hidden_size": 64, "colour": "red"}))
    (root / "odd.json").write_text(json.dumps({**config.to_dict(), "hidden_size": 250}))
    (root / "notjson.json").write_text("{hidden_size: 64")
    truncated = root / "truncated"
    subprocess.run(["cp", "-r", str(root / "ckpt"), str(truncated)], check=True)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    mismatched = root / "mismatched"
    subprocess.run(["cp", "-r", str(root / "ckpt"), str(mismatched)], check=True)
    (mismatched / "config.json").write_text(tiny_config(hidden_size=64).to_json())
    modified = root / "modified-onnx"
    subprocess.run(["cp", "-r", str(root / "exports" / "fp32"), str(modified)], check=True)
    data = bytearray((modified / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (modified / "model.onnx.data").write_bytes(bytes(data))
    (root / "garbage.pte").write_bytes(b"not a program" * 100)
    (root / "empty").mkdir()
    finished = root / "finished-run"  # trained to the end, its checkpoints since deleted
    subprocess.run(["cp", "-r", str(run), str(finished)], check=True)
    subprocess.run(["rm", "-r", str(finished / "checkpoints")], check=True)
    (root / "mine").mkdir()  # a folder of the user's that bibo-export never wrote
    (root / "mine" / "notes.txt").write_text("the user's own notes")
    (root / "user" / "int8").mkdir(parents=True)  # where an int8 export of --out user would go
    (root / "user" / "int8" / "notes.txt").write_text("the user's own notes")
    # A checkpoint in a folder named as a precision: --out its parent would replace it.
    subprocess.run(["mkdir", "-p", str(root / "nested")], check=True)
    subprocess.run(["cp", "-r", str(root / "ckpt"), str(root / "nested" / "fp32")], check=True)
    huge = root / "huge"  # a config edited to sizes no machine holds
    subprocess.run(["cp", "-r", str(root / "ckpt"), str(huge)], check=True)
    (huge / "config.json").write_text(tiny_config(**{**config.to_dict(),
                                                     "vocab_size": 4_000_000_000}).to_json())
    broken = BiBoForCausalLM(config)  # a checkpoint whose eager logits are NaN
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    broken.save_pretrained(root / "nan")
    return {"root": root, "model": root / "model.json", "ckpt": root / "ckpt", "run": run,
            "hostile": hostile, "onnx": root / "exports" / "fp32", "exports": root / "exports",
            "corpus": root / "corpus", "tokenizer": root / "tokenizer" / "tokenizer.json",
            "finished": finished, "mine": root / "mine", "user": root / "user",
            "nested": root / "nested", "home": Path.home()}


TRAIN = ("train", "--config", "{model}", "--device", "cpu", "--steps", "2", "--batch-size", "4")
# (arguments, text the error line must contain, the path that must not change: the output)
CASES = {
    # config
    "unknown config key": (("config", "--config", "{root}/bad.json"),
                           "unknown BiBoConfig key(s): colour", None),
    "config file missing": (("config", "--config", "{root}/none.json"), "config file not found",
                            None),
    "config not JSON": (("config", "--config", "{root}/notjson.json"), "not valid JSON", None),
    "config inconsistent": (("config", "--config", "{root}/odd.json"),
                            "hidden_size=250: must be divisible", None),
    "unknown preset": (("config", "--preset", "huge"), "invalid choice: 'huge'", None),
    # training options
    "capacity as a config field": ((*TRAIN, "--set", "capacity_factor=2.0", "--out", "{out}"),
                                   "capacity_factor is an execution option", "{out}"),
    "dispatch as a config field": ((*TRAIN, "--set", "moe_dispatch=dense", "--out", "{out}"),
                                   "moe_dispatch is an execution option", "{out}"),
    "lr nan": ((*TRAIN, "--lr", "nan", "--out", "{out}"), "lr must be a finite number", "{out}"),
    "lr negative": ((*TRAIN, "--lr", "-1", "--out", "{out}"), "lr must be a finite number",
                    "{out}"),
    "zero steps": ((*TRAIN, "--steps", "0", "--out", "{out}"), "steps must be an integer >= 1",
                   "{out}"),
    "zero grad accumulation": ((*TRAIN, "--grad-accum", "0", "--out", "{out}"),
                               "grad_accum must be an integer >= 1", "{out}"),
    "capacity factor zero": ((*TRAIN, "--capacity-factor", "0", "--out", "{out}"),
                             "capacity_factor=0.0: must be None", "{out}"),
    "unknown --set key": ((*TRAIN, "--set", "experts=2", "--out", "{out}"),
                          "unknown BiBoConfig key(s): experts", "{out}"),
    "--set without =": ((*TRAIN, "--set", "vocab_size", "--out", "{out}"),
                        "--set expects KEY=VALUE", "{out}"),
    "no CUDA": (("train", "--config", "{model}", "--device", "cuda", "--out", "{out}"),
                "no CUDA device", "{out}"),
    "compile mode off CUDA": ((*TRAIN, "--compile-mode", "reduce-overhead", "--out", "{out}"),
                              "--compile-mode reduce-overhead applies to --device cuda",
                              "{out}"),
    "model config missing": (("train", "--config", "{root}/none.json", "--device", "cpu",
                              "--out", "{out}"), "config file not found", "{out}"),
    "bad mesh": ((*TRAIN, "--mesh", "fsdp=two", "--out", "{out}"), "bad mesh spec 'fsdp=two'",
                 "{out}"),
    # data
    "sorting beyond max length": (("train", "--preset", "sort-tiny", "--data", "sort:999",
                                   "--device", "cpu", "--out", "{out}"),
                                  "sort:999 gives sequences of 1998 tokens", "{out}"),
    "text window beyond max length": ((*TRAIN, "--data", "text:{corpus}", "--set",
                                       "vocab_size=257", "--sequence-length", "600", "--out",
                                       "{out}"), "--sequence-length gives sequences of 600",
                                      "{out}"),
    "data path missing": ((*TRAIN, "--data", "text:/no/such/corpus", "--out", "{out}"),
                          "data path not found", "{out}"),
    "unknown data kind": ((*TRAIN, "--data", "csv:{corpus}", "--out", "{out}"),
                          "unknown data spec", "{out}"),
    "bad sorting lengths": ((*TRAIN, "--data", "sort:a,b", "--out", "{out}"),
                            "bad sorting spec 'sort:a,b'", "{out}"),
    "empty corpus": ((*TRAIN, "--data", "text:{root}/empty", "--out", "{out}"),
                     "is empty", "{out}"),
    "binary corpus": (("tokenizer", "train", "--data", "text:{ckpt}/model.safetensors",
                       "--vocab-size", "300", "--out", "{out}"), "is binary, not text", "{out}"),
    # tokenizers
    "tokenizer vocabulary below the bytes": (("tokenizer", "train", "--data", "text:{corpus}",
                                              "--vocab-size", "100", "--out", "{out}"),
                                             "--vocab-size must be an integer in [257,", "{out}"),
    "tokenizer of sorting data": (("tokenizer", "train", "--data", "sort:4", "--vocab-size",
                                   "300", "--out", "{out}"), "--data must be text:PATH", "{out}"),
    "model vocabulary below the tokenizer's": ((*TRAIN, "--data", "text:{corpus}", "--tokenizer",
                                                "{tokenizer}", "--out", "{out}"),
                                               "token ids but the model's vocab_size is 256",
                                               "{out}"),
    "tokenizer that is not one": ((*TRAIN, "--data", "text:{corpus}", "--tokenizer", "{model}",
                                   "--out", "{out}"), "is not a tokenizer.json", "{out}"),
    "tokenizer with sorting data": ((*TRAIN, "--data", "sort:4", "--tokenizer", "{tokenizer}",
                                     "--out", "{out}"), "a tokenizer goes with --data text:PATH",
                                    "{out}"),
    "text prompt for a model without tokenizer": (("generate", "--model", "{onnx}", "--prompt",
                                                   "hello"), "holds no tokenizer.json", None),
    # resuming
    "nothing to resume": ((*TRAIN, "--resume", "--out", "{out}"), "nothing to resume", "{out}"),
    "fresh run over a run": ((*TRAIN, "--data", "sort:4", "--out", "{run}"),
                             "already holds a training run", "{run}"),
    "fresh run over a finished run without checkpoints": (
        (*TRAIN, "--data", "sort:4", "--out", "{finished}"), "already holds a training run",
        "{finished}"),
    "resume changing lr": (("train", "--resume", "--lr", "0.1", "--out", "{run}"),
                           "whose lr is 0.003 (not 0.1)", "{run}"),
    "resume of a hostile optimizer.pt": (("train", "--resume", "--steps", "3", "--out",
                                          "{hostile}"), "refusing to unpickle", "{hostile}"),
    # checkpoints
    "checkpoint missing": (("info", "{root}/none"), "checkpoint folder not found", None),
    "checkpoint truncated": (("info", "{root}/truncated"), "corrupt or truncated", None),
    "checkpoint of another shape": (("info", "{root}/mismatched"), "does not match", None),
    # exports
    "export of a missing checkpoint": (("export", "onnx", "--checkpoint", "{root}/none", "--out",
                                        "{out}"), "checkpoint not found", "{out}"),
    "export of an export": (("export", "executorch", "--checkpoint", "{onnx}", "--out", "{out}"),
                            "is not a checkpoint folder", "{out}"),
    "export to a file name": (("export", "onnx", "--checkpoint", "{ckpt}", "--out",
                               "{out}.onnx"), "the output must be a folder", "{out}.onnx"),
    "export too long": (("export", "executorch", "--checkpoint", "{ckpt}", "--max-length",
                         "100000", "--out", "{out}"), "max_length must be an integer in [2, 64]",
                        "{out}"),
    "retired --int8": (("export", "onnx", "--checkpoint", "{ckpt}", "--int8", "--out", "{out}"),
                       "--int8 is now --precision int8", "{out}"),
    "retired --int8-out": (("export", "onnx", "--checkpoint", "{ckpt}", "--int8-out", "{out}2",
                            "--out", "{out}"), "--int8-out DIR is now --precision fp32,int8",
                           "{out}"),
    "retired --dtype": (("export", "executorch", "--checkpoint", "{ckpt}", "--dtype", "bf16",
                         "--out", "{out}"), "--dtype bf16 is now --precision bf16", "{out}"),
    "bf16 on ONNX": (("export", "onnx", "--checkpoint", "{ckpt}", "--precision", "bf16",
                      "--out", "{out}"), "--precision bf16 is ExecuTorch's only", "{out}"),
    "unknown precision": (("export", "onnx", "--checkpoint", "{ckpt}", "--precision",
                           "fp32,int3", "--out", "{out}"), "expected distinct precisions among",
                          "{out}"),
    "int4 group size": (("export", "executorch", "--checkpoint", "{ckpt}", "--precision", "int4",
                         "--group-size", "48", "--out", "{out}"), "invalid choice: 48", "{out}"),
    "unknown format": (("export", "tflite", "--checkpoint", "{ckpt}", "--out", "{out}"),
                       "invalid choice: 'tflite'", "{out}"),
    # output folders are the user's
    "export into its own checkpoint": (("export", "onnx", "--checkpoint", "{ckpt}", "--out",
                                        "{ckpt}"), "is or is inside the input", "{ckpt}"),
    "export whose precision folder is its checkpoint": (
        ("export", "executorch", "--checkpoint", "{nested}/fp32", "--out", "{nested}"),
        "is or contains the input", "{nested}"),
    "export into a folder of the user's": (("export", "onnx", "--checkpoint", "{ckpt}",
                                            "--precision", "int8", "--out", "{user}"),
                                           "holds files bibo-export did not write", "{user}"),
    "export over another format's export": (("export", "executorch", "--checkpoint", "{ckpt}",
                                             "--out", "{exports}"), "holds an ONNX export",
                                            "{exports}"),
    "int8 export into the user's folder": (("export", "onnx", "--checkpoint", "{ckpt}",
                                            "--precision", "fp32,int8", "--out", "{user}"),
                                           "holds files bibo-export did not write", "{user}"),
    "export to the filesystem root": (("export", "onnx", "--checkpoint", "{ckpt}", "--out", "/"),
                                      "is a filesystem root or the home folder", None),
    "export to the home folder": (("export", "onnx", "--checkpoint", "{ckpt}", "--out",
                                   "{home}"), "is a filesystem root or the home folder", None),
    "import over its source": (("import", "reference", "{ckpt}", "--out", "{ckpt}"),
                               "is or contains the input", "{ckpt}"),
    "import into a folder of the user's": (("import", "reference", "{ckpt}", "--out", "{mine}"),
                                           "holds files bibo-export did not write", "{mine}"),
    "train into a folder of the user's": ((*TRAIN, "--out", "{mine}"),
                                          "holds files bibo-export did not write", "{mine}"),
    "train into the folder of its corpus": ((*TRAIN, "--data", "text:{corpus}/a.txt", "--set",
                                             "vocab_size=257", "--out", "{corpus}"),
                                            "is or contains the input", "{corpus}"),
    "tokenizer over a file": (("tokenizer", "train", "--data", "text:{corpus}", "--vocab-size",
                               "300", "--out", "{mine}/notes.txt"),
                              "exists and is not a folder", "{mine}"),
    "tokenizer into its corpus": (("tokenizer", "train", "--data", "text:{corpus}",
                                   "--vocab-size", "300", "--out", "{corpus}"),
                                  "is or contains the input", "{corpus}"),
    "report over an artifact it reads": (("parity", "--checkpoint", "{ckpt}", "{onnx}",
                                          "--report", "{onnx}"), "is or contains the input",
                                         "{onnx}"),
    # resources
    "tokenizer vocabulary overflowing": (("tokenizer", "train", "--data", "text:{corpus}",
                                          "--vocab-size", str(10**20), "--out", "{out}"),
                                         "--vocab-size must be an integer in", "{out}"),
    "steps overflowing": ((*TRAIN, "--steps", str(10**20), "--out", "{out}"),
                          "steps must be an integer >= 1 (at most", "{out}"),
    "training a model no machine holds": ((*TRAIN, "--set", "vocab_size=4000000000", "--out",
                                           "{out}"), "needs at least", "{out}"),
    "describing a model no machine holds": (("info", "{root}/huge"), "needs at least", None),
    "exporting a model no machine holds": (("export", "onnx", "--checkpoint", "{root}/huge",
                                            "--out", "{out}"), "needs at least", "{out}"),
    # non-finite numbers
    "ONNX int8 export of a checkpoint computing NaN": (
        ("export", "onnx", "--checkpoint", "{root}/nan", "--precision", "int8", "--out",
         "{out}"),
        "non-finite logits", "{out}"),
    "ExecuTorch int8 export of a checkpoint computing NaN": (
        ("export", "executorch", "--checkpoint", "{root}/nan", "--precision", "int8",
         "--out", "{out}"),
        "non-finite logits", "{out}"),
    "parity against a checkpoint computing NaN": (
        ("parity", "--checkpoint", "{root}/nan", "--no-speed", "{onnx}"), "non-finite logits",
        None),
    # artifacts and prompts
    "modified ONNX export": (("generate", "--model", "{root}/modified-onnx", "--prompt-ids", "3"),
                             "does not match its manifest.json entry", None),
    "not a program": (("generate", "--model", "{root}/garbage.pte", "--prompt-ids", "3"),
                      "is not an ExecuTorch program", None),
    "not a model": (("generate", "--model", "{root}/empty", "--prompt-ids", "3"),
                    "is neither a checkpoint folder", None),
    "prompt not integers": (("generate", "--model", "{onnx}", "--prompt-ids", "3,x"),
                            "comma-separated integers", None),
    "prompt outside vocabulary": (("generate", "--model", "{onnx}", "--prompt-ids", "3,999"),
                                  "token id 999 is outside the vocabulary", None),
    "prompt too long": (("generate", "--model", "{onnx}", "--prompt-ids", "3",
                         "--max-new-tokens", "1000"), "exceeds the maximum length 32", None),
    "llm runner with token ids": (("generate", "--model", "{onnx}", "--prompt-ids", "3",
                                   "--llm-runner"), "--llm-runner takes text (--prompt)", None),
    "c++ runner on an ONNX export": (("generate", "--model", "{onnx}", "--prompt-ids", "3",
                                      "--runner", "cpp"), "--runner cpp runs ExecuTorch programs",
                                     None),
    "parity with text data": (("parity", "--checkpoint", "{ckpt}", "--data", "text:x", "{onnx}"),
                              "--data must be a sort[:LENGTHS] spec", None),
    "parity of a missing artifact": (("parity", "--checkpoint", "{ckpt}", "{root}/none"),
                                     "model not found", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, name):
    args, message, output = CASES[name]
    paths = {key: str(value) for key, value in world.items()} | {"out": str(tmp_path / "out")}
    watched = Path(output.format(**paths)) if output else None
    before = snapshot(watched) if watched else {}
    result = run_cli(*(arg.format(**paths) for arg in args))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if watched:
        assert snapshot(watched) == before  # nothing new under the output name, nothing changed
    assert not (world["root"] / "pwned").exists()  # no unpickled code ran


def test_the_battery_is_large_enough():
    assert len(CASES) >= 30


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(world, tmp_path):
    """A learning rate this large turns the weights to inf after one step: the run must stop at
    the step whose loss is not finite, write no final/, and keep the checkpoint before it."""
    out = tmp_path / "run"
    result = run_cli(*(arg.format(model=world["model"]) for arg in TRAIN), "--lr", "1e30",
                     "--steps", "4", "--log-every", "1", "--checkpoint-every", "1", "--out", out)
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # not the bar
    assert result.returncode != 0
    assert len(errors) == 1 and "training diverged at step 2" in errors[0], result.stderr[-3000:]
    assert "step-000001" in errors[0] and "Traceback" not in result.stderr
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
