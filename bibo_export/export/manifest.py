"""The "save" and "verify" record of an export: ``manifest.json`` next to the artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

MANIFEST_FILE = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, files: list[str | Path], **fields: Any) -> Path:
    """List ``files`` (relative to ``directory``) with sizes and hashes, plus ``fields``
    (format, precision, versions, quantized nodes, the verification result, ...)."""
    directory = Path(directory)
    entries = []
    for name in files:
        path = directory / name
        entries.append({"name": str(name), "bytes": path.stat().st_size, "sha256": sha256(path)})
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
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    for entry in manifest["files"]:
        file = directory / entry["name"]
        if not file.is_file():
            raise ValueError(f"{file} is missing (listed in {MANIFEST_FILE})")
        if file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]:
            raise ValueError(f"{file} does not match its {MANIFEST_FILE} entry (truncated or "
                             "modified)")
    return manifest
