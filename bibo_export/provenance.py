"""Where a measurement was made: the code (commit, dirty tree), the time, the machine and the
versions of the libraries that computed it. Benchmarks and the demo's record carry it, so a
published number can always be traced to what produced it."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
# The libraries whose versions decide a measured number, in both environments.
PACKAGES = ("torch", "torch_xla", "executorch", "onnxruntime")


def git(*args: str) -> str | None:
    """Run git in the repository; None where there is no repository (an installed package)."""
    try:
        return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_generation() -> str | None:
    """x86's CPU family and model numbers, as ``f26m2``: cloud VMs often name every
    generation alike ("AMD EPYC"), while the family and model tell one from the next, and with
    it which vector instructions (and so which kernels) run."""
    family, model = cpuinfo_field("cpu family"), cpuinfo_field("model")
    return f"f{family}m{model}" if family and model else None


def gpu_name() -> str | None:
    """The first CUDA device's name, if this process's torch sees one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def package_versions() -> dict[str, str]:
    """Versions of PACKAGES installed in this environment (absent ones are left out)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def provenance() -> dict[str, Any]:
    """Everything a published number needs to say where it comes from."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(status) if status is not None else None,
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_model(),
        "cpu_generation": cpu_generation(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def machine_slug(record: dict[str, Any]) -> str:
    """A short file-name-safe name of the machine: CPU model words, its generation where
    recorded, cores, GPU if any."""
    words = re.sub(r"\(.*?\)|\b(processor|cpu|core|with|radeon|graphics)\b|@.*$", " ",
                   record["cpu"], flags=re.IGNORECASE)
    slug = "-".join(re.findall(r"[a-z0-9]+", words.lower())[:4]) or "unknown-cpu"
    if record.get("cpu_generation"):
        slug += f"-{record['cpu_generation']}"
    slug += f"-{record['cores']}c"
    if record.get("gpu"):
        slug += "-" + "-".join(re.findall(r"[a-z0-9]+", record["gpu"].lower())[-2:])
    return slug
