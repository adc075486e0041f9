"""MoE dispatch benchmark: one MoE layer of the `bench` preset, forward + backward.

    python -m bench.dispatch --backend eager   # eager CPU, S = 256, 1024, 4096
    python -m bench.dispatch --backend xla     # XLA (CPU backend here), per-step time, compiles

Formulations: index and einsum (capacity_factor 1.25), grouped (dropless grouped matmuls; eager
only), dense (every expert on every token) and the reference-style dynamic loop
(bench.baselines), the baseline of every ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.baselines import LoopExperts
from bench.common import machine, table, update_results
from bibo_export.config import BiBoConfig, ExecutionOptions
from bibo_export.model.moe import MoE
from bibo_export.timing import median_seconds

FORMULATIONS = ("loop", "index", "einsum", "grouped", "dense")
# torch_xla 2.9 segfaults on torch._grouped_mm.
XLA_FORMULATIONS = tuple(f for f in FORMULATIONS if f != "grouped")
CAPACITY_FACTOR = 1.25


def make_layer(formulation: str, device: torch.device | str = "cpu") -> MoE:
    torch.manual_seed(0)
    dispatch = "index" if formulation == "loop" else formulation
    layer = MoE(BiBoConfig.preset("bench"), ExecutionOptions(CAPACITY_FACTOR, dispatch))
    if formulation == "loop":
        layer.experts.__class__ = LoopExperts  # same weights, reference-style dispatch
    for p in layer.parameters():  # trained-like spread so routing is not uniform noise
        torch.nn.init.normal_(p, std=0.02)
    return layer.to(device).train()


def forward_backward(layer: MoE, u: torch.Tensor) -> torch.Tensor:
    out, stats, _ = layer(u, None)
    out.float().square().mean().backward()
    return stats.dropped


def run_eager(tokens_list: list[int], repeats: int) -> list[dict]:
    rows = []
    for tokens in tokens_list:
        baseline = None
        for formulation in FORMULATIONS:
            layer = make_layer(formulation)
            u = torch.randn(1, tokens, layer.config.hidden_size, requires_grad=True)
            seconds = median_seconds(lambda: forward_backward(layer, u), repeats)
            dropped = forward_backward(layer, u).item()
            baseline = baseline or seconds
            assignments = tokens * layer.config.num_experts_per_tok
            rows.append(dict(backend="eager-cpu", tokens=tokens, dispatch=formulation,
                             median_ms=seconds * 1e3, ratio_vs_loop=seconds / baseline,
                             drop_rate=dropped / assignments))
            print(f"  eager S={tokens:5d} {formulation:6s} {seconds * 1e3:9.1f} ms", flush=True)
    return rows


def run_xla(tokens: int, steps: int) -> list[dict]:
    import torch_xla
    import torch_xla.debug.metrics as met
    import torch_xla.runtime as xr

    device = torch_xla.device()
    backend = f"xla-{xr.device_type().lower()}"
    rows, baseline = [], None
    for formulation in XLA_FORMULATIONS:
        layer = make_layer(formulation, device)
        met.clear_all()
        times, compiles = [], []
        for _ in range(steps):  # fresh random inputs: fresh routing every step
            u = torch.randn(1, tokens, layer.config.hidden_size).to(device).requires_grad_(True)
            start = time.perf_counter()
            forward_backward(layer, u)
            torch_xla.sync(wait=True)
            times.append(time.perf_counter() - start)
            compiles.append(met.metric_data("CompileTime")[0] if met.metric_data("CompileTime")
                            else 0)
        seconds = statistics.median(times[2:])
        baseline = baseline or seconds
        fallbacks = sorted(n for n in met.counter_names() if n.startswith("aten::"))
        rows.append(dict(backend=backend, tokens=tokens, dispatch=formulation,
                         median_ms=seconds * 1e3, ratio_vs_loop=seconds / baseline,
                         compiles=compiles[-1], compiles_after_step2=compiles[-1] - compiles[1],
                         cpu_fallbacks=",".join(fallbacks) or "none"))
        print(f"  xla S={tokens} {formulation:6s} {seconds * 1e3:9.1f} ms, "
              f"{compiles[-1]} compiles", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("eager", "xla"), required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--xla-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    print(f"== dispatch benchmark ({args.backend}): one `bench` MoE layer, forward+backward")
    if args.backend == "eager":
        rows = run_eager(args.tokens, args.repeats)
        columns = ["tokens", "dispatch", "median_ms", "ratio_vs_loop", "drop_rate"]
    else:
        rows = run_xla(args.xla_tokens, args.steps)
        columns = ["backend", "tokens", "dispatch", "median_ms", "ratio_vs_loop", "compiles",
                   "compiles_after_step2", "cpu_fallbacks"]
    path = update_results("dispatch", args.backend, {"machine": machine(), "rows": rows,
                                                      "capacity_factor": CAPACITY_FACTOR})
    print(table(rows, columns))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
