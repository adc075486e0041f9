"""Exports at real size: a random-init ``reference``-preset checkpoint (752.6M parameters) to
ONNX fp32 + int8 + int4 (one trace) and to ExecuTorch fp32, int8, int4 and bf16, each through
the CLI in its own process, as a user would run them.

    python -m bench.scale [--preset reference] [--max-length 256] [--work bench/work/scale]

Per export: wall time, peak resident memory of the exporting process and its children (the
kernel's high-water mark for the process, and the sum over the process tree sampled every
0.1 s, whichever is larger), artifact sizes, and the export's own verification against eager.
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, table, update_results
from bibo_export.artifacts import check_manifest
from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM

PAGE = os.sysconf("SC_PAGE_SIZE")


def random_checkpoint(preset: str, folder: Path) -> Path:
    """A seeded random-init checkpoint of ``preset``, written once and reused."""
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    model = BiBoForCausalLM(BiBoConfig.preset(preset)).eval()
    model.save_pretrained(str(folder))
    print(f"wrote {folder}: {model.num_parameters() / 1e6:.1f}M parameters", flush=True)
    return folder


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # the process ended while we looked
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def run_measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command``; its wall time, exit status and peak memory (bytes)."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak_sampled, done = 0, threading.Event()

        def sample() -> None:
            nonlocal peak_sampled
            while not done.wait(0.1):
                peak_sampled = max(peak_sampled, tree_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "returncode": process.returncode,
            "peak_rss_bytes": max(peak_sampled, usage.ru_maxrss * 1024)}


def export_row(name: str, command: list[str], folders: dict[str, Path],
               work: Path) -> dict[str, Any]:
    print(f"[scale] {name}: {' '.join(command[2:])}", flush=True)
    measured = run_measured(command, work / f"{name.replace(' ', '-')}.log")
    row: dict[str, Any] = {"export": name, "wall_s": measured["wall_s"],
                           "peak_rss_gb": measured["peak_rss_bytes"] / 1e9,
                           "exit": measured["returncode"]}
    for precision, folder in folders.items():
        if measured["returncode"] != 0 or not (folder / "manifest.json").is_file():
            row[f"{precision}_verified"] = False
            continue
        manifest = check_manifest(folder)
        check = manifest["verification"]
        row.update({f"{precision}_mb": manifest["total_bytes"] / 1e6,
                    f"{precision}_verified": check["passed"],
                    f"{precision}_max_abs": check["max_abs"],
                    f"{precision}_top1": check["top1_agreement"],
                    f"{precision}_cosine": check["cosine"],
                    f"{precision}_greedy_match": check["greedy_match"]})
        if "decode_weight_bytes_per_token" in manifest:
            row[f"{precision}_decode_mb_per_token"] = \
                manifest["decode_weight_bytes_per_token"]["touched"] / 1e6
    print(f"[scale] {name}: {row['wall_s']:.0f} s, peak {row['peak_rss_gb']:.1f} GB, "
          f"exit {row['exit']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("bench/work/scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = random_checkpoint(args.preset, args.work / f"{args.preset}-random")
    parameters = json.loads((checkpoint / "config.json").read_text())
    cli = [sys.executable, "-m", "bibo_export.cli", "export"]
    common = ["--checkpoint", str(checkpoint), "--max-length", str(args.max_length)]
    onnx, executorch = args.work / "onnx", args.work / "executorch"
    onnx_precisions = ("fp32", "int8", "int4")
    exports = [("onnx " + "+".join(onnx_precisions),
                [*cli, "onnx", *common, "--precision", ",".join(onnx_precisions), "--out",
                 str(onnx)], {p: onnx / p for p in onnx_precisions})]
    exports += [(f"executorch {p}", [*cli, "executorch", *common, "--precision", p, "--out",
                                     str(executorch)], {p: executorch / p})
                for p in ("fp32", "int8", "int4", "bf16")]
    rows = [export_row(name, command, folders, args.work) for name, command, folders in exports]
    fp32 = {"onnx": rows[0].get("fp32_mb"), "executorch": rows[1].get("fp32_mb")}
    for row in rows:
        for precision in ("int8", "int4", "bf16"):
            reference = fp32[row["export"].split()[0]]
            if row.get(f"{precision}_mb") and reference:
                row[f"{precision}_vs_fp32"] = row[f"{precision}_mb"] / reference
    path = update_results("scale", args.preset, {
        "machine": {**machine(), "cpus": os.cpu_count(),
                    "memory_gb": os.sysconf("SC_PHYS_PAGES") * PAGE / 1e9},
        "preset": args.preset, "max_length": args.max_length,
        "config": {k: parameters[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                              "num_routed_experts", "num_experts_per_tok")},
        "rows": rows})
    print(table(rows, ["export", "wall_s", "peak_rss_gb", "fp32_mb", "int8_mb", "int8_vs_fp32",
                       "int4_mb", "int4_vs_fp32", "bf16_mb", "bf16_vs_fp32", "fp32_verified",
                       "int8_verified", "int4_verified", "bf16_verified", "fp32_max_abs",
                       "int8_cosine", "int4_cosine", "bf16_cosine"]))
    print(f"wrote {path}")
    if any(row["exit"] != 0 for row in rows):
        raise SystemExit("an export failed: see the logs in " + str(args.work))


if __name__ == "__main__":
    main()
