"""The documentation stays true: numbers come from published snapshots, commands exist, the
repository points nowhere outside itself, and the make targets pick the checkpoint a user just
trained."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import publish
from bibo_export.cli import build_parser
from helpers import make_dry_run, repository_mirror

pytestmark = pytest.mark.export  # once per suite: nothing here depends on the environment

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Internal references a user cannot follow: the design brief outside the repository, its
# section numbers, and issue numbers (a hash or the word "issue" before digits).
FORBIDDEN = [(re.compile(r"\.\./shared|\bshared/fixtures"), "a path outside the repository"),
             (re.compile(r"\bDESIGN(\.md|\s*§)"), "the design brief outside the repository"),
             (re.compile(r"(?<![\w&/#])#\d+\b"), "an issue number"),
             (re.compile(r"\bissues? \d+", re.IGNORECASE), "an issue number")]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    files = []
    for name in names:
        path = ROOT / name
        try:
            files.append((path, path.read_text()))
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # weights, archives
    return files


def test_nothing_points_outside_the_repository_or_at_issue_numbers():
    found = [f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}: {what}: "
             f"{match.group(0)!r}"
             for path, text in tracked_text_files() for pattern, what in FORBIDDEN
             for match in pattern.finditer(text)]
    assert not found, "\n".join(found)


def test_the_forbidden_patterns_catch_what_they_should():
    # Spelled in pieces, so that this file does not trip its own check.
    for line in ["see ../" + "shared/notes", "the bars of DESIGN" + " §7", "fixed in #" + "13",
                 "as issue" + " 5 asked", "read DESIGN" + ".md"]:
        assert any(pattern.search(line) for pattern, _ in FORBIDDEN), line
    for line in ["[Benchmarks](#benchmarks)", "&#8212;", "top-1 agreement", "layer 0 (3 MoE)"]:
        assert not any(pattern.search(line) for pattern, _ in FORBIDDEN), line


def test_generated_pages_equal_what_the_snapshots_give():
    stale = publish.stale_pages(ROOT)
    assert not stale, f"{stale} differ from the snapshots: run python -m bench.publish regenerate"


def fake_demo_record(wall_s: float) -> dict:
    report = {"checkpoint": "runs/demo/final", "passed": True, "rows": [
        {"runtime": "eager", "precision": "fp32", "max_abs": 0.0, "top1_agreement": 1.0,
         "cosine": 1.0, "greedy_match": True, "token_accuracy": 0.991,
         "sequence_accuracy": 0.953, "bytes": 1e6}]}
    source = {"commit": "f" * 40, "dirty": False, "utc": "2031-01-02T03:04:05Z",
              "cpu": "Test CPU 9000", "cores": 7, "gpu": None, "python": "3.11.0",
              "versions": {"torch": "9.9"}}
    return {"kind": "demo", "provenance": source, "wall_s": wall_s, "train_s": wall_s / 2,
            "report": report}


def copy_of_generated_inputs(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / publish.SNAPSHOTS, tmp_path / publish.SNAPSHOTS)
    return tmp_path


def test_a_new_or_changed_snapshot_makes_the_pages_stale(tmp_path):
    root = copy_of_generated_inputs(tmp_path)
    assert publish.stale_pages(root) == []
    record = fake_demo_record(wall_s=1234.0)
    snapshot = publish.write_snapshot(root, record, "page")
    assert set(publish.stale_pages(root)) == {publish.INDEX, publish.README}
    publish.regenerate(root)
    assert publish.stale_pages(root) == []
    readme = (root / "README.md").read_text()
    assert "20 min 34 s" in readme and "95.3%" in readme and snapshot.stem in readme

    changed = copy.deepcopy(record)
    changed["wall_s"] = 1500.0
    snapshot.write_text(json.dumps(changed))
    assert publish.README in publish.stale_pages(root)


def test_snapshots_are_never_rewritten(tmp_path):
    root = copy_of_generated_inputs(tmp_path)
    publish.write_snapshot(root, fake_demo_record(100.0), "page")
    with pytest.raises(publish.PublishError, match="never rewritten"):
        publish.write_snapshot(root, fake_demo_record(200.0), "page")


def trained_run(mirror: Path, name: str, age_s: float) -> None:
    final = mirror / "runs" / name / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    stamp = final.stat().st_mtime - age_s
    os.utime(final, (stamp, stamp))


def test_exports_after_make_demo_use_the_demo_checkpoint_without_training(tmp_path):
    mirror = repository_mirror(tmp_path)
    trained_run(mirror, "sort-tiny", age_s=3600)
    trained_run(mirror, "demo", age_s=0)
    for target in ("export-onnx", "export-executorch-int4"):
        result = make_dry_run(mirror, target)
        assert result.returncode == 0, result.stderr
        assert "--checkpoint runs/demo/final" in result.stdout
        assert "bibo-export train" not in result.stdout
        assert "checkpoint runs/demo/final (the last trained run)" in result.stdout


def test_exports_train_make_train_tpus_run_when_nothing_was_trained(tmp_path):
    result = make_dry_run(repository_mirror(tmp_path), "export-onnx")
    assert result.returncode == 0, result.stderr
    assert "bibo-export train --preset sort-tiny" in result.stdout


def shown_commands(path: Path) -> list[str]:
    """Every command line inside the fenced shell blocks of a Markdown file (continuations
    joined, comments dropped)."""
    commands, block = [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block in ("bash", "sh", "shell"):
            commands.append(line)
    joined = "\n".join(commands).replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def checked(command: str, mirror: Path) -> str | None:
    """Why ``command`` would not work as shown (None if it would)."""
    words = shlex.split(command)
    if words[0] == "make":
        result = make_dry_run(mirror, *words[1:])
        return None if result.returncode == 0 else result.stderr.strip()[-300:]
    if words[0].endswith("bin/bibo-export"):
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            return "bibo-export refuses these arguments"
    return None


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_command_shown_exists(page, tmp_path, capsys):
    mirror = repository_mirror(tmp_path)
    trained_run(mirror, "demo", age_s=0)
    for export in ("onnx/fp32", "onnx/int8", "executorch/fp32", "executorch/int8"):
        (mirror / "artifacts" / export).mkdir(parents=True)  # what make parity compares
    commands = [c for c in shown_commands(page) if c.startswith(("make ", ".venv"))]
    problems = [f"{command}: {why}" for command in commands
                if (why := checked(command, mirror)) is not None]
    assert not problems, "\n".join(problems)


def test_a_bench_snapshot_names_the_code_that_measured_it():
    def section(commit, utc, versions):
        source = {**fake_demo_record(1.0)["provenance"], "commit": commit, "utc": utc,
                  "versions": versions, "threads": 1}
        return {"machine": source, "rows": [{"runtime": "eager", "decode_tok_s": 1.0}]}

    results = {"onnx": {"bench": section("a" * 40, "2031-01-02T05:00:00Z", {"torch": "2.13"})},
               "train": {"xla": section("a" * 40, "2031-01-02T04:00:00Z", {"torch_xla": "2.9"})}}
    source = publish.measured_provenance(results)
    assert source["commit"] == "a" * 40 and source["utc"] == "2031-01-02T04:00:00Z"
    assert source["versions"] == {"torch": "2.13", "torch_xla": "2.9"} and "threads" not in source
    results["train"]["xla"]["machine"]["commit"] = "b" * 40
    with pytest.raises(publish.PublishError, match="different code"):
        publish.measured_provenance(results)
