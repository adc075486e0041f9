"""Text in, text out, end to end: a small language model trained through the CLI on tokenized
text, exported with its tokenizer (ONNX fp32 and int4, ExecuTorch int8 and int4), generating
eager's greedy text in fp32 and the integer programs' own under ExecuTorch's ``TextLLMRunner``
too; parity measures held-out perplexity (the integer bars: docs/parity.md)."""

from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from executorch.runtime import Runtime as ETRuntime

from bibo_export.artifacts import check_manifest
from bibo_export.export.executorch import export_executorch
from bibo_export.export.onnx import export_onnx
from bibo_export.io import file_sha256
from bibo_export.model import BiBoForCausalLM
from bibo_export.parity import run_parity
from bibo_export.runtimes import load
from bibo_export.runtimes.llm_runner import TextRunner
from bibo_export.tokenizer import TextTokenizer
from bibo_export.verdict import judge
from bibo_export.train.run import RunFolder
from helpers import run_cli

pytestmark = pytest.mark.export

MAX_LENGTH = 48
PROMPT = "def forward(self"
NEW_TOKENS = 12
# Text every machine has that does not change with this project's code: the interpreter's
# own multiprocessing package. The model it trains is then the same on every checkout of one
# commit (training here is deterministic), so a parity verdict seen in CI is seen locally too.
# And ASCII: the runner hands each token to Python as text, so a token holding part of a
# multi-byte character would be an error there.
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "multiprocessing" / "*.py"
TEXT_EXPORTS = {"onnx": ("fp32", "int4"), "executorch": ("int8", "int4")}
MODEL = ("hidden_size=64", "intermediate_size=128", "num_hidden_layers=2",
         "moe_intermediate_size=64", "num_routed_experts=4", "max_position_embeddings=64")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """(run folder, exports by name) of a text-tiny variant trained briefly on the corpus."""
    root = tmp_path_factory.mktemp("text")
    run_cli("tokenizer", "train", "--data", f"text:{CORPUS}", "--vocab-size", 512, "--out",
            root / "tokenizer", check=True)
    overrides = [arg for item in MODEL for arg in ("--set", item)]
    run_cli("train", "--preset", "text-tiny", *overrides, "--data", f"text:{CORPUS}",
            "--tokenizer", root / "tokenizer" / "tokenizer.json", "--device", "cpu",
            "--steps", 150, "--batch-size", 8, "--sequence-length", 64, "--checkpoint-every", 75,
            "--out", root / "run", check=True)
    final = root / "run" / "final"
    # The ExecuTorch fp32 program's parity is test_executorch.py's, ONNX int8's test_onnx.py's.
    exports = {f"{runtime} {precision}": root / f"{runtime}-{precision}"
               for runtime, precisions in TEXT_EXPORTS.items() for precision in precisions}
    for runtime, export in (("onnx", export_onnx), ("executorch", export_executorch)):
        export(final, {precision: exports[f"{runtime} {precision}"]
                       for precision in TEXT_EXPORTS[runtime]}, max_length=MAX_LENGTH)
    return RunFolder(root / "run"), exports


def greedy_text(model: Path) -> str:
    """A runtime's greedy continuation of PROMPT, decoded by the tokenizer library. The oracle
    of a checkpoint's fp32 exports is eager PyTorch's text (the checkpoint's); an integer
    program's is its own, through our runtime, since int8 and int4 are judged by their
    perplexity bars (docs/parity.md), not by identical tokens."""
    tokenizer = TextTokenizer.from_file(model)
    ids = tokenizer.encode(PROMPT)
    tokens = load(model).generate(np.array([ids]), NEW_TOKENS)[0, len(ids):].tolist()
    if tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens)


def test_the_tokenizer_travels_with_every_checkpoint_and_export(text_model):
    run, exports = text_model
    original = file_sha256(run.tokenizer)
    holders = [run.final, *run.checkpoints.iterdir(), *exports.values()]
    assert len(holders) == 3 + len(exports)  # final, two checkpoints and the exports
    for folder in holders:
        assert file_sha256(folder / "tokenizer.json") == original, folder
    for folder in exports.values():
        manifest = check_manifest(folder)
        assert manifest["tokenizer_sha256"] == original
        assert "tokenizer.json" in [entry["name"] for entry in manifest["files"]]


def test_a_changed_tokenizer_fails_the_manifest_check(text_model, tmp_path):
    _, exports = text_model
    copy = tmp_path / "onnx"
    subprocess.run(["cp", "-r", str(exports["onnx fp32"]), str(copy)], check=True)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="tokenizer.json does not match"):
        check_manifest(copy)


def test_generate_prints_the_greedy_text_of_every_runtime(text_model):
    run, exports = text_model
    eager = greedy_text(run.final)
    assert len(eager) > 4  # something was generated
    for name, model in [("eager fp32", run.final), *exports.items()]:
        expected = json.dumps(PROMPT + (eager if name.endswith("fp32") else greedy_text(model)),
                              ensure_ascii=False)
        out = run_cli("generate", "--model", model, "--prompt", PROMPT, "--max-new-tokens",
                      NEW_TOKENS, check=True).stdout
        assert out == f"{name}: {expected}\n", name


@pytest.mark.parametrize("precision", TEXT_EXPORTS["executorch"])
def test_executorch_llm_runner_generates_the_greedy_text(text_model, precision):
    """ExecuTorch's own runner drives the program as our runtime does (see greedy_text)."""
    program = text_model[1][f"executorch {precision}"]
    runner = TextRunner(program)
    expected = greedy_text(program)
    assert runner.generate(PROMPT, NEW_TOKENS) == expected
    # A second call starts afresh: the runner at position 0, the program's conv states zeroed.
    assert runner.generate(PROMPT, NEW_TOKENS) == expected


def test_the_runner_metadata_methods_hold_the_config(text_model):
    run, exports = text_model
    config = BiBoForCausalLM.from_pretrained(run.final).config
    eos = TextTokenizer.from_file(run.final).eos_id
    program = ETRuntime.get().load_program(exports["executorch int8"] / "model.pte")
    values = {name: program.load_method(name).execute([]) for name in (
        "get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id",
        "get_eos_ids", "use_kv_cache", "enable_dynamic_shape")}
    assert values == {"get_max_seq_len": [MAX_LENGTH], "get_max_context_len": [MAX_LENGTH],
                      "get_vocab_size": [config.vocab_size], "get_bos_id": [eos],
                      "get_eos_ids": [eos], "use_kv_cache": [True],
                      "enable_dynamic_shape": [True]}
    assert config.vocab_size == TextTokenizer.from_file(run.final).vocab_size


def test_parity_measures_held_out_perplexity(text_model):
    run, exports = text_model
    ids, labels = run.held_out_text()
    result = run_parity(run.final, list(exports.values()), speed=False, text=(ids, labels),
                        log=lambda line: None)
    model = BiBoForCausalLM.from_pretrained(run.final).eval()
    window = torch.from_numpy(ids[:, :MAX_LENGTH])
    with torch.no_grad():
        logits = model(window).logits
    oracle = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).double(), torch.from_numpy(labels[:, :MAX_LENGTH]).flatten()).exp()
    eager, *others = result["rows"]
    assert eager["perplexity"] == pytest.approx(float(oracle), rel=1e-5)
    for row in others:
        assert row["perplexity_increase"] == pytest.approx(
            row["perplexity"] / eager["perplexity"] - 1)
        assert row["passed"], row["failed_bars"]
    assert 1 < eager["perplexity"] < 512 / 2  # it learned something from its corpus


def test_int4_top1_is_judged_on_the_sorting_task_and_recorded_on_text():
    """The verdict's one precision-dependent exception (docs/parity.md): int4's top-1 bar
    applies where the task is sorting, not where perplexity measures a text model; int8's
    applies to both."""
    close = {"max_abs": 0.5, "cosine": 0.999, "greedy_match": False, "top1_agreement": 0.9}
    text, sorting = {**close, "perplexity_increase": 0.01}, {**close, "token_accuracy_drop": 0.0}
    assert judge(text, "onnx", "int4", scope="task") == []
    assert judge(sorting, "onnx", "int4", scope="task") == ["top-1 agreement 0.9000 < 0.95"]
    assert judge(text, "onnx", "int8", scope="task") == ["top-1 agreement 0.9000 < 0.98"]
    assert judge({**text, "perplexity_increase": 0.06}, "onnx", "int4", scope="task") == \
        ["held-out perplexity +6.00% vs eager > +5%"]
