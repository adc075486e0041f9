"""Training throughput: tokens/s of the real train step, static dispatch vs the dynamic baseline.

    python -m bench.train --backend eager   # eager CPU (.venv)
    python -m bench.train --backend xla     # torch_xla: TPU if present, else its CPU backend

For the `sort-tiny` and `bench` presets: median step time after warm-up, tokens/s, the time of
the first (compiling) steps, XLA compilations, for `index` dispatch (capacity 1.25) and for the
reference-style dynamic loop (bench.baselines), whose routing-dependent shapes recompile on XLA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.baselines import LoopExperts
from bench.common import machine, table, update_results
from bibo_export.config import BiBoConfig, ExecutionOptions
from bibo_export.model import BiBoForCausalLM
from bibo_export.train.backend import select_backend
from bibo_export.train.optim import build_optimizer, warmup_cosine
from bibo_export.train.step import TrainStep

SHAPES = {"sort-tiny": (32, 16), "bench": (8, 128)}  # batch, tokens per sequence


def measure(preset: str, dispatch: str, backend_name: str, steps: int) -> dict:
    backend = select_backend(backend_name)
    before = backend.compile_stats()  # XLA's counters are per process: report this row's share
    torch.manual_seed(0)
    model = BiBoForCausalLM(BiBoConfig.preset(preset), ExecutionOptions(capacity_factor=1.25))
    if dispatch == "loop":
        for moe in model.moe_layers:
            moe.experts.__class__ = LoopExperts  # same weights, reference-style dispatch
    model = model.to(backend.device).train()
    lr = torch.zeros((), device=backend.device)
    counter = torch.zeros((), device=backend.device)
    optimizer = build_optimizer(model, lr, 0.01, capturable=backend.name != "cpu", foreach=False)
    step = TrainStep(model, optimizer, lr, counter,
                     lambda s: warmup_cosine(s, 1e-3, 10, 1000, 0.1), grad_clip=1.0)
    step = step if dispatch == "loop" else backend.compile_step(step)
    batch, length = SHAPES[preset]
    vocab = model.config.vocab_size
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (1, batch, length)).to(backend.device)
        start = time.perf_counter()
        metrics = step(ids, ids)
        backend.sync()
        metrics["loss"].cpu()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[2:])
    stats = backend.compile_stats()
    fallbacks = set(stats.get("cpu_fallbacks", [])) - set(before.get("cpu_fallbacks", []))
    return dict(backend=backend.name, preset=preset, dispatch=dispatch,
                tokens_per_s=batch * length / median, median_step_ms=median * 1e3,
                first_two_steps_s=times[0] + times[1],
                compiles=stats.get("xla_compiles", 0) - before.get("xla_compiles", 0),
                cpu_fallbacks=", ".join(sorted(fallbacks)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("eager", "xla"), required=True)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loop-steps", type=int,
                        help="steps for the loop baseline (default --steps); on XLA each of its "
                             "steps recompiles, so more steps only repeat the same cost")
    parser.add_argument("--dispatches", nargs="+", default=["loop", "index"],
                        choices=["loop", "index"],
                        help="loop: the dynamic baseline (on XLA it recompiles every step)")
    args = parser.parse_args()
    loop_steps = args.loop_steps or args.steps
    if min(args.steps, loop_steps) < 3:
        parser.error("--steps and --loop-steps must be at least 3: the first two steps "
                     "(compilation) are not timed")

    device = "cpu" if args.backend == "eager" else "xla"
    print(f"== train benchmark ({args.backend}): train step tokens/s, index vs dynamic loop")
    for preset in args.presets:  # one results section per preset: presets can run separately
        rows = []
        for dispatch in args.dispatches:
            steps = loop_steps if dispatch == "loop" else args.steps
            rows.append(measure(preset, dispatch, device, steps))
            rows[-1]["steps"] = steps
            print(f"  {preset:9s} {dispatch:5s} {rows[-1]['tokens_per_s']:9.0f} tok/s",
                  flush=True)
        if [row["dispatch"] for row in rows] == ["loop", "index"]:
            rows[0]["speedup_vs_loop"] = 1.0
            rows[1]["speedup_vs_loop"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        path = update_results("train", f"{args.backend} {preset}", {
            "machine": machine(), "batch_tokens": SHAPES[preset],
            "rows": rows})
        print(table(rows, ["backend", "preset", "dispatch", "steps", "tokens_per_s",
                           "speedup_vs_loop", "median_step_ms", "first_two_steps_s", "compiles",
                           "cpu_fallbacks"]))
        print(f"results: {path}")


if __name__ == "__main__":
    main()
