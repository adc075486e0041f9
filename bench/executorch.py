"""ExecuTorch benchmark on the `bench` preset: prefill latency, decode speed, sizes, and the
weight bytes a decoded token reads, for the two ways a program computes the routed experts.

    python -m bench.executorch                 # random-init `bench` model, exported here
    python -m bench.executorch --checkpoint DIR
    python -m bench.executorch --preset sort-tiny --prompt 16 --rounds 2   # a quick run

Rows: eager fp32 (the reference), then ExecuTorch fp32, int8 and int4 programs with *fused* experts
(every routed expert runs, inside XNNPACK) and with *selected* experts (BiBo's kernel runs the
chosen ones; attention reads only the cache slots in use). Prefill is one call of
T = --prompt tokens at B = 1; decode is tokens/s of single-token steps after it, each step
timed alone (the median step). Every runtime gets --threads threads (default 1, as
bench-onnx: with ExecuTorch's default pool of one thread per core, steps spread 3-fold on a
shared 2-core machine). One more row
times the int8 selected program exported at the CLI's default maximum length
(``--long-max-length``): a longer static cache, which a decode step must not pay for. Runtimes
are timed in alternating rounds (medians), so the machine's drift hits every row alike.

The same four programs also run in BiBo's C++ runner (rows ending "c++ runner"): no Python,
ExecuTorch's released C++ runtime, each call timed inside the runner (three generations per
round, medians). ``python_us_per_token`` is what the Python runtime adds to a decode step:
1/its tokens/s minus 1/the runner's, in microseconds.

Decode bytes per token: fused programs read every weight (counted from the program's
tensors); selected programs are measured, the experts' part by the kernel's own counter over
the decode steps, plus everything outside the routed experts. Both are compared with the
active-parameter minimum (k routed experts per MoE layer).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import interleaved_medians, machine, table, update_results
from bibo_export.config import BiBoConfig
from bibo_export.export.executorch import export_executorch
from bibo_export.kernels.library import read_counters
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes import load
from bibo_export.runtimes.base import Runtime
from bibo_export.runtimes.cpp_runner import run_cpp_runner
from bibo_export.threads import use_threads
from bibo_export.timing import time_runtime

PRECISIONS = ("fp32", "int8", "int4")
PROGRAMS = [(experts, precision) for experts in ("fused", "selected") for precision in PRECISIONS]
CPP = " c++ runner"
COLUMNS = ["runtime", "prefill_ms", "decode_tok_s", "decode_vs_fused", "decode_vs_int8",
           "python_us_per_token", "bytes", "size_vs_fp32", "decode_weight_bytes",
           "active_minimum_bytes",
           "touched_vs_minimum", "bytes_measured_by", "delegate_calls", "portable_ops",
           "max_abs_vs_eager"]


def random_checkpoint(directory: Path, preset: str) -> Path:
    torch.manual_seed(0)
    BiBoForCausalLM(BiBoConfig.preset(preset)).save_pretrained(directory)
    return directory


def kernel_bytes_per_decode_step(runtime: Runtime, prompt: np.ndarray, new_tokens: int) -> float:
    """Expert weight bytes the kernel read per decode step: generate(n) minus generate(1)."""
    read_counters(reset=True)
    runtime.generate(prompt, 1)
    prefill = read_counters(reset=True).weight_bytes
    runtime.generate(prompt, new_tokens)
    return (read_counters(reset=True).weight_bytes - prefill) / (new_tokens - 1)


def runner_timing(program: Path, prompt: np.ndarray, new_tokens: int,
                  threads: int) -> dict[str, float]:
    """The C++ runner's own timings of three generations in one process: the median prefill
    (the first follows the program's load) and the median decode step."""
    done = run_cpp_runner(program, [prompt[0].tolist()] * 3, new_tokens, threads=threads)
    return {"prefill_ms": done.prefill_ms, "decode_tok_s": done.decode_tok_s}


def program_row(record: dict[str, Any], runtime: Runtime, prompt: np.ndarray,
                new_tokens: int) -> dict[str, Any]:
    weight_bytes = record["decode_weight_bytes_per_token"]
    row = {"bytes": record["total_bytes"], "delegate_calls": record["ops"]["delegate_calls"],
           "portable_ops": record["ops"]["portable_ops"],
           "active_minimum_bytes": weight_bytes["active_minimum"],
           "max_abs_vs_eager": record["verification"]["max_abs"]}
    if record["experts"] == "selected":
        row["decode_weight_bytes"] = weight_bytes["outside_routed_experts"] + \
            kernel_bytes_per_decode_step(runtime, prompt, new_tokens)
        row["bytes_measured_by"] = "kernel counter"
    else:
        row["decode_weight_bytes"] = weight_bytes["touched"]
        row["bytes_measured_by"] = "program tensors (all experts run)"
    row["touched_vs_minimum"] = row["decode_weight_bytes"] / row["active_minimum_bytes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: a random-init --preset model")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and ExecuTorch alike (default 1: fair on a "
                             "shared box)")
    parser.add_argument("--long-max-length", type=int, default=2048,
                        help="also time int8 selected exported at this maximum length, at most "
                             "the model's positions (0: skip)")
    args = parser.parse_args()
    max_length = args.prompt + args.decode_steps
    use_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(tmp / "checkpoint", args.preset)
        records = {}
        for experts in ("fused", "selected"):
            outs = {precision: tmp / f"{experts}-{precision}" for precision in PRECISIONS}
            for precision, record in export_executorch(checkpoint, outs, max_length=max_length,
                                                       experts=experts).items():
                records[f"executorch {precision} {experts}"] = record
        config = BiBoForCausalLM.from_pretrained(checkpoint).config
        prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))
        runtimes = {"eager fp32": load(checkpoint)}
        runtimes.update({f"executorch {precision} {experts}": load(tmp / f"{experts}-{precision}")
                         for experts, precision in PROGRAMS})
        long_max_length = min(args.long_max_length, config.max_position_embeddings)
        if long_max_length > max_length:
            name = f"executorch int8 selected (max length {long_max_length})"
            records[name] = export_executorch(checkpoint, {"int8": tmp / "long"},
                                              max_length=long_max_length)["int8"]
            runtimes[name] = load(tmp / "long")
        measures = {name: lambda runtime=runtime: time_runtime(runtime, prompt,
                                                               args.decode_steps, repeats=1)
                    for name, runtime in runtimes.items()}
        measures.update({
            f"executorch {precision} {experts}{CPP}":
                lambda folder=tmp / f"{experts}-{precision}": runner_timing(
                    folder, prompt, args.decode_steps, args.threads)
            for experts, precision in PROGRAMS})
        timings = interleaved_medians(lambda measure: measure(), measures, args.rounds)
        rows = []
        for name, runtime in runtimes.items():
            row = {"runtime": name, **timings[name]}
            if name in records:
                row.update(program_row(records[name], runtime, prompt, args.decode_steps))
            rows.append(row)
        rows += [{"runtime": name, **timings[name]} for name in measures if name.endswith(CPP)]
    by_name = {row["runtime"]: row for row in rows}
    for row in rows:
        if row["runtime"].endswith(CPP):
            python = by_name[row["runtime"].removesuffix(CPP)]["decode_tok_s"]
            row["python_us_per_token"] = (1 / python - 1 / row["decode_tok_s"]) * 1e6
    for experts, precision in PROGRAMS:
        row = by_name[f"executorch {precision} {experts}"]
        row["decode_vs_fused"] = row["decode_tok_s"] / \
            by_name[f"executorch {precision} fused"]["decode_tok_s"]
        if precision != "fp32":
            row["size_vs_fp32"] = row["bytes"] / by_name[f"executorch fp32 {experts}"]["bytes"]
        if precision == "int4":
            row["decode_vs_int8"] = row["decode_tok_s"] / \
                by_name[f"executorch int8 {experts}"]["decode_tok_s"]
    section = "custom" if args.checkpoint else args.preset
    path = update_results("executorch", section, {
        "machine": machine(), "checkpoint": str(args.checkpoint or f"random {args.preset}"),
        "prompt_tokens": args.prompt, "batch_size": 1, "decode_steps": args.decode_steps,
        "rounds": args.rounds, "threads": args.threads, "rows": rows})
    print(table(rows, COLUMNS))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
