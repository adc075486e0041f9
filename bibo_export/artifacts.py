"""The artifact contract: what files a checkpoint or an export folder holds, the manifest that
lists them, how to tell the kinds apart, and the metadata an exported model carries.

Every kind is a folder:

* a **checkpoint**: ``config.json`` + ``model.safetensors`` (the contract between training and
  export);
* an **ONNX export**: ``model.onnx`` + ``model.onnx.data`` + ``manifest.json``;
* an **ExecuTorch export**: ``model.pte`` + ``manifest.json``.

A model trained on tokenized text also holds its ``tokenizer.json`` (every kind; an export
lists it in its manifest, whose ``tokenizer_sha256`` names it).

An export's manifest lists its files with sizes and sha256 hashes beside what the exporter
recorded (precision, versions, the verification against eager); a loader checks it first, so a
truncated or modified file is reported as such. A ``.pte`` file given by itself still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import BiBoConfig
from .io import atomic_write_text, file_sha256

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
PTE_FILE = "model.pte"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_CONFIG_FILE = "train_config.json"  # marks a training run's folder
REPORT_FILE = "report.json"  # marks a parity report's folder
PRECISIONS = ("fp32", "bf16", "int8", "int4")
INTEGER_PRECISIONS = ("int8", "int4")  # integer weights, int8 activations quantized per token
# int4 weights have one scale per group of this many consecutive weights of a row; XNNPACK's
# 4-bit kernels and BiBo's take groups that are multiples of 32. 32 by measurement: on the
# trained sort-tiny (embedding int8), int4 cosine against eager was 0.9984 / 0.9987
# (ExecuTorch / ONNX) at 32, 0.9982 / 0.9985 at 64 and 0.9980 / 0.9982 at 128, every size
# meeting the int4 bars, for programs 12 % (ExecuTorch) and 16 % (ONNX) larger than at 128;
# BiBo's int4 expert kernel took the same time at all three (within the noise of a 2-core
# machine, 2026-12-07).
INT4_GROUP_SIZES = (32, 64, 128)
INT4_GROUP_SIZE = 32


def check_group_size(group_size: int) -> None:
    """Refuse an int4 group size outside ``INT4_GROUP_SIZES``, in one line."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"the int4 group size must be one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}")


# How an ExecuTorch program computes the routed experts: "selected" reads only the chosen
# experts through BiBo's kernel library (bibo_export/kernels); "fused" reads every expert and
# needs only ExecuTorch's own kernels.
EXPERT_MODES = ("selected", "fused")

Kind = Literal["checkpoint", "onnx", "executorch"]
MODEL_FILES: dict[str, tuple[str, ...]] = {"checkpoint": (WEIGHTS_FILE,),
                                           "onnx": (ONNX_FILE, ONNX_DATA_FILE),
                                           "executorch": (PTE_FILE,)}


def artifact_kind(path: str | Path) -> Kind:
    """What ``path`` is, or a one-line ``ValueError`` naming what was expected."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model not found: {path}")
    if path.is_file() and path.suffix == ".pte":
        check_program_identifier(path)
        return "executorch"
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).exists():
            return "checkpoint"
        if (path / ONNX_FILE).exists():
            return "onnx"
        if (path / PTE_FILE).exists():
            return "executorch"
    raise ValueError(f"{path} is neither a checkpoint folder ({CONFIG_FILE} + {WEIGHTS_FILE}), "
                     f"an ONNX export folder ({ONNX_FILE}) nor an ExecuTorch export "
                     f"({PTE_FILE} or a .pte file)")


def check_program_identifier(path: Path) -> None:
    """Refuse a file that does not carry an ExecuTorch program's file identifier ("ET" then
    the format's version, at bytes 4-8), before anything imports ExecuTorch to load it."""
    with path.open("rb") as f:
        head = f.read(8)
    if head[4:6] != b"ET":
        raise ValueError(f"{path} is not an ExecuTorch program (no ET file identifier)")


def program_file(path: str | Path) -> Path:
    """The ``.pte`` of an ExecuTorch export folder, or ``path`` itself when it is the file."""
    path = Path(path)
    return path / PTE_FILE if path.is_dir() else path


def tokenizer_beside(path: str | Path) -> Path | None:
    """The ``tokenizer.json`` that travels with a model folder (or beside a ``.pte``), if any."""
    path = Path(path)
    found = (path if path.is_dir() else path.parent) / TOKENIZER_FILE
    return found if found.is_file() else None


def artifact_bytes(path: str | Path) -> int:
    """Bytes of a model's own files (weights, graph, program), manifests and notes excluded."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum((path / name).stat().st_size for name in MODEL_FILES[artifact_kind(path)]
               if (path / name).is_file())


# ------------------------------------------------------------------------------ manifest
def write_manifest(directory: str | Path, files: list[str], **fields: Any) -> Path:
    """List ``files`` (relative to ``directory``) with sizes and hashes, plus ``fields``
    (format, precision, versions, the verification result, ...)."""
    directory = Path(directory)
    entries = [{"name": name, "bytes": (directory / name).stat().st_size,
                "sha256": file_sha256(directory / name)} for name in files]
    manifest = {**fields, "files": entries,
                "total_bytes": sum(entry["bytes"] for entry in entries)}
    path = directory / MANIFEST_FILE
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path


def check_manifest(directory: str | Path) -> dict[str, Any]:
    """Read a manifest and confirm every listed file exists with its recorded size and hash."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {MANIFEST_FILE}: not a complete export")
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    for entry in entries:
        file = directory / entry["name"]
        if not file.is_file():
            raise ValueError(f"{file} is missing (listed in {MANIFEST_FILE})")
        if file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
            raise ValueError(f"{file} does not match its {MANIFEST_FILE} entry (truncated or "
                             "modified)")
    return manifest


# ------------------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class ArtifactMetadata:
    """What an exported model says about itself: stored in the artifact (ONNX metadata
    properties, an ExecuTorch constant method), so the file alone is enough to run it."""

    config: BiBoConfig
    max_length: int  # prompt + generated tokens the cache holds
    precision: str
    batch_size: int | None = None  # None: any batch size
    eos_id: int | None = None  # the tokenizer's end-of-text token, for models that have one

    def to_json(self) -> str:
        return json.dumps({"config": self.config.to_dict(), "max_length": self.max_length,
                           "precision": self.precision, "batch_size": self.batch_size,
                           "eos_id": self.eos_id})

    @classmethod
    def from_json(cls, text: str, source: str | Path) -> ArtifactMetadata:
        try:
            values = json.loads(text)
            config, _ = BiBoConfig.from_saved(values["config"])
            return cls(config, int(values["max_length"]), values["precision"],
                       values.get("batch_size"), values.get("eos_id"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source} carries no readable bibo-export metadata ({err})") \
                from None
