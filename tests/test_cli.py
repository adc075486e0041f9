"""The command line: resolved configs out, one-line errors for bad input."""

import json
import subprocess
import sys

import torch

from bibo_export.model import BiBoForCausalLM
from helpers import tiny_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bibo_export.cli", *args],
                          capture_output=True, text=True)


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
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 64, "colour": "red"}))
    for args, message in [(("config", "--config", str(bad)), "unknown BiBoConfig key(s): colour"),
                          (("info", str(tmp_path / "missing")), "checkpoint folder not found")]:
        result = run_cli(*args)
        assert result.returncode == 2
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
