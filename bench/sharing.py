"""Sharing the cores: eager decode of `text-tiny` alone and beside other processes, with every
core's worth of threads (PyTorch's default) and with the share ``BIBO_JOBS`` gives.

    python -m bench.sharing [--tokens 24] [--rounds 3]

Each row runs the decode in a fresh process (thread counts are fixed at a process's start),
beside nothing, beside a busy process that is not PyTorch (``yes``), or beside another PyTorch
process that keeps all its threads busy (matmuls and elementwise operators), as a second export
lane or test worker does. "default" rows run both processes with PyTorch's default threads (one
per core); "share" rows start both as make's two parallel lanes do (``BIBO_JOBS`` = 2). The
baseline of every ratio is a lone process with every core: the idle "default" row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import machine, table, update_results
from bibo_export.threads import JOBS_VARIABLE, THREADS_VARIABLE, available_cores

# One process's eager decode: random text-tiny weights, a 12-token prompt, ms per token.
DECODE = """
import json, statistics, sys, time
import numpy as np, torch
from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.threads import use_thread_share
from bibo_export.timing import timed_generation
threads = use_thread_share()
torch.manual_seed(0)
runtime = EagerRuntime(BiBoForCausalLM(BiBoConfig.preset("text-tiny")).eval(), max_length=64)
ids = np.random.default_rng(0).integers(0, 2048, (1, 12))
steps = []
for attempt in range({rounds} + 1):
    _, decode = timed_generation(runtime, ids, {tokens})
    if attempt:
        steps += decode
print(json.dumps(dict(threads=threads, ms_per_token=statistics.median(steps) * 1e3)))
"""
# The neighbour: operators big enough that PyTorch runs them on all its threads (matmuls and
# elementwise work over a million values), back to back, as an export's eager stages do.
NEIGHBOUR = """
import torch
from bibo_export.threads import use_thread_share
use_thread_share()
a, b, x = torch.randn(256, 512), torch.randn(512, 512) / 23, torch.randn(1 << 20)
while True:
    a = torch.tanh(a @ b)
    x.mul_(0.999).add_(0.001)
"""
CONDITIONS = ("idle", "beside yes", "beside PyTorch")


def run_decode(condition: str, share: bool, tokens: int, rounds: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in (JOBS_VARIABLE, THREADS_VARIABLE)}
    if share:  # as one of two lanes of make: half the cores
        env[JOBS_VARIABLE] = "2"
    else:  # PyTorch's default: a thread per core, whatever else runs
        env[THREADS_VARIABLE] = str(available_cores())
    neighbour = None
    if condition == "beside yes":
        neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    elif condition == "beside PyTorch":
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    try:
        time.sleep(1 if neighbour else 0)  # the neighbour is busy before the decode starts
        output = subprocess.run([sys.executable, "-c", DECODE.format(tokens=tokens,
                                                                     rounds=rounds)],
                                env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=3, help="generations per process")
    parser.add_argument("--repeats", type=int, default=3,
                        help="processes per row (the row is their median)")
    args = parser.parse_args()
    print(f"== sharing benchmark: eager text-tiny decode, {available_cores()} cores")
    rows = []
    for condition in CONDITIONS:
        for share in (False, True):
            runs = [run_decode(condition, share, args.tokens, args.rounds)
                    for _ in range(args.repeats)]
            rows.append({"condition": condition, "threads": "share" if share else "default",
                         "decode_threads": runs[0]["threads"],
                         "ms_per_token": statistics.median(r["ms_per_token"] for r in runs)})
            print(f"  {condition}, {rows[-1]['threads']} threads: "
                  f"{rows[-1]['ms_per_token']:.1f} ms/token", flush=True)
    idle = rows[0]["ms_per_token"]  # idle, default threads: a lone process
    for row in rows:
        row["vs_idle"] = row["ms_per_token"] / idle
    path = update_results("sharing", "text-tiny", {"machine": machine(), "tokens": args.tokens,
                                                   "rows": rows})
    print(table(rows, ["condition", "threads", "decode_threads", "ms_per_token", "vs_idle"]))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
