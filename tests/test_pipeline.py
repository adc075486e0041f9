"""The whole pipeline through the command line, shortened: train a few steps → export ONNX and
ExecuTorch in fp32 and int8 → ``parity`` → report. Then ``parity`` on a corrupted export.

A two-layer model keeps the four exports (ExecuTorch lowering above all) to a few minutes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import run_cli, tiny_config

from bibo_export.artifacts import MANIFEST_FILE, ONNX_DATA_FILE, ONNX_FILE, write_manifest
from bibo_export.export.onnx import save_model

pytestmark = [pytest.mark.export, pytest.mark.e2e]

MAX_LENGTH = 32
EXPORTS = {("onnx", "fp32"): "onnx/fp32", ("onnx", "int8"): "onnx/int8",
           ("executorch", "fp32"): "executorch/fp32", ("executorch", "int8"): "executorch/int8"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(vocab_size=256, num_hidden_layers=2, num_routed_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=MAX_LENGTH)
    (root / "model.json").write_text(config.to_json())
    run, artifacts = root / "run", root / "artifacts"
    run_cli("train", "--config", root / "model.json", "--data", "sort:4", "--steps", 8,
            "--batch-size", 8, "--device", "cpu", "--out", run, "--log-every", 2,
            "--eval-every", 4, "--checkpoint-every", 4, check=True)
    checkpoint = run / "final"
    length = ("--max-length", MAX_LENGTH)
    for runtime in ("onnx", "executorch"):  # one call, two exports sharing their first stages
        run_cli("export", runtime, "--checkpoint", checkpoint, *length,
                "--out", artifacts / EXPORTS[runtime, "fp32"],
                "--int8-out", artifacts / EXPORTS[runtime, "int8"], check=True)
    # A fresh interpreter: the noise to filter comes from imports and from loading a program.
    generated = run_cli("generate", "--model", artifacts / EXPORTS["executorch", "int8"],
                        "--prompt-ids", "3,1,2,255", "--max-new-tokens", 2,
                        fresh_interpreter=True, check=True)
    result = run_cli("parity", "--checkpoint", checkpoint, "--report", artifacts,
                     *(artifacts / name for name in EXPORTS.values()))
    return checkpoint, artifacts, result, generated


def test_known_noise_is_filtered_from_the_command_line(pipeline):
    """torchao's import-time warnings and ExecuTorch's C++ cpuinfo lines (written to fd 2 when a
    program loads) never reach the user: generate on an int8 program prints its answer only."""
    generated = pipeline[3]
    assert generated.stdout.startswith("executorch: prompt 3,1,2,255 -> ")
    assert generated.stderr == ""


def test_report_has_every_row_and_fp32_meets_its_bars(pipeline):
    _, artifacts, result, _ = pipeline
    # Exit 0, or 1 when only int8 bars fail: 8 steps do not make a model int8 is judged on.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads((artifacts / "report.json").read_text())
    rows = {(row["runtime"], row["precision"]): row for row in report["rows"]}
    assert set(rows) == {("eager", "fp32"), *EXPORTS}
    for key in EXPORTS:
        row = rows[key]
        for column in ("max_abs", "top1_agreement", "cosine", "greedy_match", "token_accuracy",
                       "sequence_accuracy", "prefill_ms", "decode_tok_s", "bytes"):
            assert column in row, (key, column)
        if key[1] == "fp32":
            assert row["passed"], (key, row["failed_bars"])
            assert row["max_abs"] <= 1e-3 and row["greedy_match"]
    failed = [key for key in EXPORTS if not rows[key]["passed"]]
    assert (result.returncode == 1) == bool(failed)
    markdown = (artifacts / "report.md").read_text()
    assert markdown.count("\n| onnx |") == 2 and markdown.count("\n| executorch |") == 2
    assert {p.name for p in (artifacts / "plots").iterdir()} == {
        "loss.png", "heldout.png", "expert_load.png", "drop_rate.png"}
    for plot in (artifacts / "plots").iterdir():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def perturbed_copy(source, destination, scale: float):
    """An ONNX export whose weights were changed after the fact, with a manifest rewritten to
    match: loads cleanly, computes something else (what a buggy exporter would produce)."""
    shutil.copytree(source, destination)
    model = onnx.load(destination / ONNX_FILE)
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and np.prod(tensor.dims) >= 1024:
            values = onnx.numpy_helper.to_array(tensor)
            values = values + scale * rng.standard_normal(values.shape).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    (destination / ONNX_DATA_FILE).unlink()
    save_model(model, destination / ONNX_FILE)
    manifest = json.loads((destination / MANIFEST_FILE).read_text())
    manifest.pop("files"), manifest.pop("total_bytes")
    write_manifest(destination, [ONNX_FILE, ONNX_DATA_FILE], **manifest)
    return destination


def test_parity_fails_on_a_corrupted_export_and_names_the_bar(pipeline, tmp_path):
    checkpoint, artifacts, _, _ = pipeline
    corrupted = perturbed_copy(artifacts / "onnx/fp32", tmp_path / "corrupted", scale=0.05)
    result = run_cli("parity", "--checkpoint", str(checkpoint), "--no-speed", str(corrupted))
    assert result.returncode == 1
    assert "FAILED onnx fp32" in result.stderr and "max |Δ logits|" in result.stderr
    # The untouched export passes the same command.
    run_cli("parity", "--checkpoint", checkpoint, "--no-speed", artifacts / "onnx/fp32",
            check=True)


def test_parity_rejects_a_modified_export_as_one_line(pipeline, tmp_path):
    """Changed bytes without a matching manifest: refused before any comparison."""
    checkpoint, artifacts, _, _ = pipeline
    damaged = tmp_path / "damaged"
    shutil.copytree(artifacts / "onnx/fp32", damaged)
    data = bytearray((damaged / ONNX_DATA_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / ONNX_DATA_FILE).write_bytes(bytes(data))
    result = run_cli("parity", "--checkpoint", str(checkpoint), str(damaged))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "manifest" in result.stderr
