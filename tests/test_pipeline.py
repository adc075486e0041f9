"""The whole pipeline through the command line: train → export ONNX and ExecuTorch in fp32 and
int8 → ``parity`` → report. Then ``parity`` on a corrupted export.

The trained model and its four exports are the session's (``trained_sort_tiny`` and
``trained_export``, made by the same commands), which the runtime tests read too: each is
made once per test run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import run_cli, trained_export_command

from bibo_export.artifacts import MANIFEST_FILE, ONNX_DATA_FILE, ONNX_FILE, write_manifest
from bibo_export.export.onnx import save_model

pytestmark = [pytest.mark.export, pytest.mark.e2e]

EXPORTS = [("onnx", "fp32"), ("onnx", "int8"), ("executorch", "fp32"), ("executorch", "int8")]


@pytest.fixture(scope="module")
def pipeline(trained_sort_tiny, trained_export, tmp_path_factory):
    """(checkpoint, {(runtime, precision): export folder}, parity's result and report folder,
    generate's result)."""
    checkpoint = trained_sort_tiny[0]
    folders = {key: trained_export(*key)[2] for key in EXPORTS}
    # A fresh interpreter: the noise to filter comes from imports and from loading a program.
    generated = run_cli("generate", "--model", folders["executorch", "int8"],
                        "--prompt-ids", "3,1,2,255", "--max-new-tokens", 2,
                        fresh_interpreter=True, check=True)
    report = tmp_path_factory.mktemp("report")
    result = run_cli("parity", "--checkpoint", checkpoint, "--report", report,
                     *folders.values())
    return checkpoint, folders, result, report, generated


def test_known_noise_is_filtered_from_the_command_line(pipeline):
    """torchao's import-time warnings and ExecuTorch's C++ cpuinfo lines (written to fd 2 when a
    program loads) never reach the user: generate on an int8 program prints its answer only."""
    generated = pipeline[4]
    assert generated.stdout.startswith("executorch: prompt 3,1,2,255 -> ")
    assert generated.stderr == ""


def test_exports_write_nothing_to_stderr(pipeline):
    """Progress goes to stdout; stderr is for problems. onnxruntime's quantizer, imported by the
    ONNX exporter, configured logging at INFO and an int8 export wrote some 700 lines there."""
    root = pipeline[1]["onnx", "fp32"].parent.parent
    for runtime, precision in EXPORTS:
        command = trained_export_command(runtime, precision, root)[0]
        assert (root / f"{command}.stderr").read_text() == "", command


def test_report_has_every_row_and_every_row_meets_its_bars(pipeline):
    _, _, result, report_folder, _ = pipeline
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_folder / "report.json").read_text())
    rows = {(row["runtime"], row["precision"]): row for row in report["rows"]}
    assert set(rows) == {("eager", "fp32"), *EXPORTS}
    for key in EXPORTS:
        row = rows[key]
        for column in ("max_abs", "top1_agreement", "cosine", "greedy_match", "token_accuracy",
                       "sequence_accuracy", "prefill_ms", "decode_tok_s", "bytes"):
            assert column in row, (key, column)
        assert row["passed"], (key, row["failed_bars"])
        if key[1] == "fp32":
            assert row["max_abs"] <= 1e-3 and row["greedy_match"]
    markdown = (report_folder / "report.md").read_text()
    assert markdown.count("\n| onnx |") == 2 and markdown.count("\n| executorch |") == 2
    assert {p.name for p in (report_folder / "plots").iterdir()} == {
        "loss.png", "heldout.png", "expert_load.png", "drop_rate.png"}
    for plot in (report_folder / "plots").iterdir():
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
    checkpoint, folders, _, _, _ = pipeline
    corrupted = perturbed_copy(folders["onnx", "fp32"], tmp_path / "corrupted", scale=0.05)
    result = run_cli("parity", "--checkpoint", str(checkpoint), "--no-speed", str(corrupted))
    assert result.returncode == 1
    assert "FAILED onnx fp32" in result.stderr and "max |Δ logits|" in result.stderr
    # The untouched export passes the same command.
    run_cli("parity", "--checkpoint", checkpoint, "--no-speed", folders["onnx", "fp32"],
            check=True)


def test_parity_rejects_a_modified_export_as_one_line(pipeline, tmp_path):
    """Changed bytes without a matching manifest: refused before any comparison."""
    checkpoint, folders, _, _, _ = pipeline
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["onnx", "fp32"], damaged)
    data = bytearray((damaged / ONNX_DATA_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / ONNX_DATA_FILE).write_bytes(bytes(data))
    result = run_cli("parity", "--checkpoint", str(checkpoint), str(damaged))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "manifest" in result.stderr
