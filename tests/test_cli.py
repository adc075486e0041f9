"""The command line: resolved configs out, one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from bibo_export.model import BiBoForCausalLM
from helpers import CLI_TIMEOUT_S, run_cli, tiny_config


def test_config_prints_resolved_json():
    result = run_cli("config", "--preset", "sort-tiny")
    assert result.returncode == 0
    assert json.loads(result.stdout)["rope_theta"] > 624


def test_info_describes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    BiBoForCausalLM(tiny_config()).save_pretrained(tmp_path)
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "3 layers (2 MoE)" in result.stdout


def test_bad_input_is_one_line_and_non_zero(tmp_path):
    """In a fresh interpreter (``python -m bibo_export.cli``), as a user's command runs."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 64, "colour": "red"}))
    for args, message in [(("config", "--config", str(bad)), "unknown BiBoConfig key(s): colour"),
                          (("info", str(tmp_path / "missing")), "checkpoint folder not found")]:
        result = run_cli(*args, fresh_interpreter=True)
        assert result.returncode == 2
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (("export", "onnx", "--checkpoint", "{tmp}/none", "--out", "{tmp}/out"),
     "checkpoint not found"),
    (("export", "executorch", "--checkpoint", "{tmp}/none", "--out", "{tmp}/out"),
     "checkpoint not found"),
    (("export", "executorch", "--checkpoint", "{tmp}/ckpt", "--max-length", "100000", "--out",
      "{tmp}/out"), "max_length must be an integer in [2, 128]"),
    (("generate", "--model", "{tmp}/garbage.pte", "--prompt-ids", "3"),
     "is not an ExecuTorch program"),
], ids=["onnx checkpoint", "executorch checkpoint", "max length", "not a program"])
def test_bad_input_is_refused_before_onnx_or_executorch_is_imported(tmp_path, args, message):
    """onnx and executorch take seconds to import: a mistyped path must not wait for them. In a
    fresh interpreter, since a forked one inherits what the test process imported."""
    BiBoForCausalLM(tiny_config()).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "garbage.pte").write_bytes(b"not a program" * 100)
    argv = [arg.format(tmp=tmp_path) for arg in args]
    code = ("import sys; from bibo_export.cli import main; status = main(sys.argv[1:]); "
            "print(status, *sorted({m.split('.')[0] for m in sys.modules} & "
            "{'onnx', 'onnxruntime', 'executorch', 'torchao'}))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    assert message in result.stderr, result.stderr
    assert result.stdout.split() == ["2"], result.stdout  # the exit status, no library


def test_generate_through_the_eager_runtime(tmp_path):
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    result = run_cli("generate", "--model", str(tmp_path), "--prompt-ids", "3,1,2,60",
                     "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    from bibo_export.model.generate import greedy_generate
    expected = greedy_generate(model.eval(), torch.tensor([[3, 1, 2, 60]]), 5)[0, 4:].tolist()
    assert result.stdout.strip() == f"eager: prompt 3,1,2,60 -> {','.join(map(str, expected))}"


@pytest.mark.parametrize("args, message", [
    (("generate", "--model", "{ckpt}", "--prompt-ids", "3,x"), "comma-separated integers"),
    (("generate", "--model", "{ckpt}", "--prompt-ids", "3,64"), "token id 64 is outside"),
    (("generate", "--model", "{ckpt}", "--prompt-ids", "3", "--max-new-tokens", "200"),
     "exceeds the maximum length 128"),
    (("generate", "--model", "{tmp}/none", "--prompt-ids", "3"), "model not found"),
    (("generate", "--model", "{tmp}", "--prompt-ids", "3"), "neither a checkpoint folder"),
    pytest.param(("export", "onnx", "--checkpoint", "{tmp}/none", "--out", "{tmp}/o"),
                 "not found", marks=pytest.mark.export),
    pytest.param(("export", "executorch", "--checkpoint", "{tmp}/none", "--out", "{tmp}/m"),
                 "not found", marks=pytest.mark.export),
    (("export", "tflite", "--checkpoint", "{ckpt}", "--out", "{tmp}/o"), "invalid choice"),
])
def test_bad_runtime_and_export_input_is_one_line(tmp_path, args, message):
    ckpt = tmp_path / "ckpt"
    BiBoForCausalLM(tiny_config()).save_pretrained(ckpt)
    result = run_cli(*(a.format(ckpt=ckpt, tmp=tmp_path) for a in args))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
