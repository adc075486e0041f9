"""Files: crash-safe writes (under a temporary name in the same folder, then renamed), their
content hashes, and the lock that keeps two writers out of one output.

Folders are published with one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``): at every
instant the target holds the complete previous folder or the complete new one, never nothing,
so a kill at any point leaves a loadable artifact. Temporaries are hidden siblings named after
the target and the writing process (``.NAME.PID-XXXX.tmp``); a later write to the same target
removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# renameat2(2) flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_LIBC = ctypes.CDLL(None, use_errno=True)
# Below this many free bytes a failed write is taken for a full disk: libraries that lose the
# errno (safetensors, torch.save) report it in their own words.
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(ValueError):
    """No space was left while writing an output; its temporary was removed and whatever the
    target held before is intact."""


class OutputBusyError(ValueError):
    """Another process is writing the same output."""


def rename2(source: str | Path, target: str | Path, flags: int) -> None:
    """``renameat2`` with ``flags`` (RENAME_EXCHANGE swaps two existing paths atomically;
    RENAME_NOREPLACE fails with EEXIST instead of replacing)."""
    if _LIBC.renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                       flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "code: 28" in str(err):
        return True
    with contextlib.suppress(OSError):
        stats = os.statvfs(folder)
        return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def disk_full_as_one_line(path: Path, folder: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` (in ``folder``) into a ``DiskFullError``; the
    outermost writer names its target (a checkpoint, not a file inside its temporary)."""
    try:
        yield
    except Exception as err:
        if not (isinstance(err, DiskFullError) or is_disk_full(err, folder)):
            raise
        raise DiskFullError(f"no space left on the device while writing {path}; nothing was "
                            "replaced (free some space, or write elsewhere)") from None


def temporary_prefix(path: Path) -> str:
    """``.NAME.PID-``: hidden, and naming the process that may still be writing it."""
    return f".{path.name}.{os.getpid()}-"


def remove_stale_temporaries(path: Path) -> None:
    """Remove the hidden temporaries of ``path`` left by processes that no longer run (a
    crash or a kill mid-write)."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid = entry.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds.

    A crash mid-write leaves the old file (or none) under the real name, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        with disk_full_as_one_line(path, path.parent):
            yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path`` whole.

    Exports write several files (an ONNX graph and its external data, a manifest): they appear
    together or not at all, and a failed export leaves the previous one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path), suffix=".tmp",
                                dir=path.parent))
    try:
        with disk_full_as_one_line(path, path.parent):
            yield tmp
        publish_directory(tmp, path)
    finally:
        # After an exchange ``tmp`` holds the previous folder; after a failure, the partial one.
        if tmp.exists():
            shutil.rmtree(tmp)


def publish_directory(ready: Path, path: Path) -> None:
    """Put the folder ``ready`` at ``path`` in one atomic step: an exchange when ``path``
    exists (``ready`` then holds what was there), a no-replace rename when it does not."""
    try:
        rename2(ready, path, RENAME_NOREPLACE)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise ValueError(f"{path} is not a folder: it cannot be replaced by one") from None
        rename2(ready, path, RENAME_EXCHANGE)


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold ``path``'s writer lock (an ``flock`` on the hidden ``.NAME.lock`` beside it) for the
    body; a second writer of the same path fails at once with ``OutputBusyError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock.read_text().strip() if lock.is_file() else "?"
            raise OutputBusyError(f"{path} is being written by another bibo-export process "
                                  f"(pid {holder or '?'}); wait for it, or choose another "
                                  "output") from None
        # A holder that finished unlinks the file it locked: lock the file now at that name.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
