"""Output folders are the user's. Before a command writes a folder, one check decides whether it
may, and says so in one line before any work:

* never a filesystem root (a mount point) or the home folder;
* never one of the command's inputs, nor a folder that contains one: publishing replaces the
  output whole, which would take the input with it;
* an existing folder only when it is empty, or a bibo-export output of the same kind
  (recognised by its own files: a manifest, a run's ``train_config.json``, a report's
  ``report.json``), which is replaced and said so; anything else only with ``--overwrite``.

While the command runs it holds the output's writer lock (``io.output_lock``), so a second
bibo-export writing the same folder ends at once instead of racing the first.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .artifacts import (CONFIG_FILE, MANIFEST_FILE, REPORT_FILE, TOKENIZER_FILE,
                        TRAIN_CONFIG_FILE, WEIGHTS_FILE)
from .config import BiBoConfig, parse_json_object
from .io import output_lock

KIND_NAMES = {"checkpoint": "a bibo-export checkpoint", "onnx": "an ONNX export",
              "executorch": "an ExecuTorch export", "run": "a training run",
              "tokenizer": "a tokenizer folder", "report": "a parity report"}


class OutputRefused(ValueError):
    """The output folder is the user's to keep; nothing was written."""


@dataclass(frozen=True)
class Output:
    """A folder a command writes: its ``kind`` (a key of KIND_NAMES), the ``inputs`` it must
    not swallow, and whether an earlier output of the same kind is replaced by default."""

    path: Path
    kind: str
    inputs: tuple[Path, ...] = ()
    replaces_same_kind: bool = True
    flag: str = "--out"
    checked: bool = True  # False: only locked (a resumed run writes into its own folder)
    keep_hint: str = ""  # how else to use an output of the same kind that is not replaced


def folder_kind(path: Path) -> str | None:
    """Which bibo-export output the folder ``path`` holds, from its own files; None for
    anything else."""
    if (path / TRAIN_CONFIG_FILE).is_file():
        return "run"
    if (path / MANIFEST_FILE).is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found = json.loads((path / MANIFEST_FILE).read_text()).get("format")
            return found if found in ("onnx", "executorch") else None
        return None
    if (path / REPORT_FILE).is_file():
        return "report"
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        try:  # the original BiBo's checkpoints have the same file names, not our config
            BiBoConfig.from_saved(parse_json_object((path / CONFIG_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return "checkpoint"
    if visible_entries(path) == [TOKENIZER_FILE]:
        return "tokenizer"
    return None


def visible_entries(path: Path) -> list[str]:
    """Names in a folder, our hidden temporaries and locks left out."""
    return sorted(entry.name for entry in path.iterdir() if not entry.name.startswith("."))


def is_protected(path: Path) -> bool:
    """A filesystem root or mount point, or the home folder: never replaced whole."""
    home = Path(os.path.expanduser("~")).resolve()
    return path == Path(path.anchor) or os.path.ismount(path) or path == home


def check_output(output: Output, overwrite: bool = False) -> str | None:
    """Refuse ``output`` (``OutputRefused``, one line) unless the command may write it; the
    line to print when it replaces something, else None."""
    path, name = output.path, KIND_NAMES[output.kind]
    if not output.checked:
        return None
    resolved = path.resolve()
    if is_protected(resolved):
        raise OutputRefused(f"{output.flag} {path} is a filesystem root or the home folder: "
                            "choose a folder inside it")
    for given in output.inputs:
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise OutputRefused(f"{output.flag} {path} is or contains the input {given}: "
                                "writing it would destroy that input; choose another folder")
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        raise OutputRefused(f"{output.flag} {path} exists and is not a folder; remove it, or "
                            "choose another folder")
    found = folder_kind(path)
    if not visible_entries(path):
        return None
    if found == output.kind and output.replaces_same_kind:
        return f"replacing {name} in {path}"
    if overwrite:
        return f"--overwrite: replacing {path} ({KIND_NAMES.get(found, 'not ours')})"
    if found == output.kind:
        raise OutputRefused(f"{output.flag} {path} already holds {name}: {output.keep_hint}"
                            "pass --overwrite to replace it, or choose another folder")
    held = f"holds {KIND_NAMES[found]}" if found else "holds files bibo-export did not write"
    raise OutputRefused(f"{output.flag} {path} exists and {held}, not {name} to replace: "
                        "pass --overwrite to replace it, or choose another folder")


@contextlib.contextmanager
def claimed_outputs(outputs: Sequence[Output], overwrite: bool = False) -> Iterator[None]:
    """Check every output (all before any is locked), print what each replaces, and hold
    their writer locks for the body."""
    notes = [check_output(output, overwrite) for output in outputs]
    with contextlib.ExitStack() as locks:
        for output in outputs:
            locks.enter_context(output_lock(output.path))
        for note in filter(None, notes):
            print(note, flush=True)
        yield
