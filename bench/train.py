"""Training throughput: tokens/s of the real train step, static dispatch vs the dynamic baseline.

    python -m bench.train --backend eager   # eager CPU (.venv)
    python -m bench.train --backend xla     # torch_xla: TPU if present, else its CPU backend
    python -m bench.train --backend cuda    # torch.compile + bf16 autocast on a CUDA GPU

Each row: median step time after warm-up, tokens/s, the time of the first (compiling) steps and
XLA compilations, for `index` dispatch (capacity 1.25), for `grouped` (dropless grouped matmuls;
CUDA and eager CPU) and for the reference-style dynamic loop (bench.baselines), whose
routing-dependent shapes recompile on XLA. CUDA rows add the model
FLOP utilisation (``train_flops_per_token``), peak memory, torch.compile's graph count and,
per compile mode, the largest loss difference from the dispatch's first mode over the same
batches (``max_loss_gap``).
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
from bibo_export.train.backend import COMPILE_MODES, Backend, select_backend
from bibo_export.train.optim import build_optimizer, initialize_state, warmup_cosine
from bibo_export.train.step import TrainStep

# (batch, tokens per sequence) per preset: small on the CPU backends, realistic on a GPU.
SHAPES = {"sort-tiny": [(32, 16)], "bench": [(8, 128)]}
CUDA_SHAPES = {"bench": [(16, 512)], "reference": [(4, 1024), (8, 2048)]}
# Dense bf16 tensor-core peak per GPU (the SXM parts' data sheets), the denominator of MFU.
BF16_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}
COLUMNS = ["backend", "preset", "dispatch", "batch", "length", "steps", "tokens_per_s",
           "speedup_vs_loop", "median_step_ms", "first_two_steps_s", "compiles", "cpu_fallbacks"]
CUDA_COLUMNS = ["backend", "preset", "dispatch", "batch", "length", "compile_mode", "steps",
                "tokens_per_s", "median_step_ms", "model_tflops", "mfu", "mfu_of_gemm_peak",
                "peak_memory_gb", "first_two_steps_s", "graphs", "graph_breaks", "max_loss_gap"]


def matmul_parameters_per_token(config: BiBoConfig) -> float:
    """Weights one token multiplies in a forward pass (the embedding is a lookup, not counted).

    A MoE layer's routed experts count at their expected share under balanced routing: of the
    k experts a token picks, on average k·(n−3)/n are SwiGLU MLPs (the other three are
    parameter-free).
    """
    h, n, k = config.hidden_size, config.num_routed_experts, config.num_experts_per_tok
    width, heads = config.moe_intermediate_size, config.num_attention_heads * config.head_dim
    attention = 2 * h * heads + 2 * h * config.num_key_value_heads * config.head_dim
    dense_ffn = 3 * h * config.intermediate_size
    router = h * n * (config.kernel_size if config.router_type == "conv" else 1)
    moe = router + (config.kernel_size + 2) * h * width + k * (n - 3) / n * 3 * h * width
    layers = sum(attention + (moe if config.is_moe_layer(i) else dense_ffn)
                 for i in range(config.num_hidden_layers))
    return layers + h * config.vocab_size  # + the LM head


def train_flops_per_token(config: BiBoConfig, length: int) -> float:
    """6 FLOPs per multiplied weight (forward 2, backward 4) plus attention's scores and
    values, 12·L·H·d·T, counted over the full T×T square as PaLM's appendix B does."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 6 * matmul_parameters_per_token(config) + attention * length


def gemm_peak_flops(device: torch.device, size: int = 8192, calls: int = 20) -> float:
    """What a large bf16 matmul achieves on this GPU now: a measured ceiling next to the
    data-sheet peak."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        a @ b
    torch.cuda.synchronize()
    return 2 * size ** 3 * calls / (time.perf_counter() - start)


def finish(backend: Backend) -> None:
    """Wait until the step's work is done, not just queued."""
    backend.sync()
    if backend.device.type == "cuda":
        torch.cuda.synchronize()


def build_step(preset: str, dispatch: str, backend: Backend) -> tuple[TrainStep, BiBoConfig]:
    torch.manual_seed(0)
    # index: capacity 1.25 (the training default); grouped never drops.
    execution = (ExecutionOptions(dispatch="grouped") if dispatch == "grouped"
                 else ExecutionOptions(capacity_factor=1.25))
    with torch.device("cuda" if backend.device.type == "cuda" else "cpu"):
        model = BiBoForCausalLM(BiBoConfig.preset(preset), execution)
    if dispatch == "loop":
        for moe in model.moe_layers:
            moe.experts.__class__ = LoopExperts  # same weights, reference-style dispatch
    model = model.to(backend.device).train()
    if dispatch != "loop":  # the loop's shapes follow the routing: it runs eagerly
        model = backend.prepare_model(model)
    lr = torch.zeros((), device=backend.device)
    counter = torch.zeros((), device=backend.device)
    optimizer = build_optimizer(model, lr, 0.01, backend.device.type)
    initialize_state(optimizer)  # as training does: the step graph compiles once
    backend.sync()
    step = TrainStep(model, optimizer, lr, counter,
                     lambda s: warmup_cosine(s, 1e-3, 10, 1000, 0.1), grad_clip=1.0,
                     autocast=backend.autocast)
    return (step if dispatch == "loop" else backend.compile_step(step)), model.config


def measure(preset: str, dispatch: str, backend: Backend, steps: int, batch: int,
            length: int) -> dict:
    before = backend.compile_stats()  # XLA's counters are per process: report this row's share
    if backend.device.type == "cuda":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.cuda.reset_peak_memory_stats()
    step, config = build_step(preset, dispatch, backend)
    times, losses = [], []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (1, batch, length)).to(backend.device)
        start = time.perf_counter()
        metrics = step(ids, ids)
        finish(backend)
        times.append(time.perf_counter() - start)
        # After the clock, and through .cpu(): .item() on an XLA tensor counts as a CPU fallback.
        losses.append(float(metrics["loss"].detach().cpu()))
    median = statistics.median(times[2:])
    stats = backend.compile_stats()
    fallbacks = set(stats.get("cpu_fallbacks", [])) - set(before.get("cpu_fallbacks", []))
    row = dict(backend=backend.name, preset=preset, dispatch=dispatch, batch=batch,
               length=length, steps=steps, tokens_per_s=batch * length / median,
               median_step_ms=median * 1e3, first_two_steps_s=times[0] + times[1],
               compiles=stats.get("xla_compiles", 0) - before.get("xla_compiles", 0),
               cpu_fallbacks=", ".join(sorted(fallbacks)), losses=losses)
    if backend.device.type == "cuda":
        counters = torch._dynamo.utils.counters
        row.update(compile_mode=backend.compile_mode,
                   model_tflops=row["tokens_per_s"] * train_flops_per_token(config, length) / 1e12,
                   peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9,
                   graphs=counters["stats"]["unique_graphs"],
                   graph_breaks=sum(counters["graph_break"].values()))
    return row


def add_utilisation(rows: list[dict], device: torch.device) -> dict:
    """MFU against the data-sheet peak (when this GPU has one here) and a measured matmul."""
    name = torch.cuda.get_device_name(device)
    peak = next((flops for gpu, flops in BF16_PEAK_FLOPS.items() if gpu in name), None)
    gemm = gemm_peak_flops(device)
    for row in rows:
        row["mfu_of_gemm_peak"] = row["model_tflops"] * 1e12 / gemm
        if peak is not None:
            row["mfu"] = row["model_tflops"] * 1e12 / peak
    return {"gpu": name, "datasheet_bf16_tflops": peak and peak / 1e12,
            "gemm_bf16_tflops": gemm / 1e12}


def add_loss_gaps(rows: list[dict]) -> None:
    """Each row's largest loss difference from the first row of its dispatch: every row trains
    the same initial model on the same batches, so a compile mode that trains differently (a
    graph replaying stale inputs, an update lost) shows here, beyond the rounding of bf16."""
    for row in rows:
        first = next(r for r in rows if r["dispatch"] == row["dispatch"])
        if row is not first:
            row["max_loss_gap"] = max(abs(a - b) for a, b in zip(row["losses"], first["losses"]))


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, length = text.partition("x")
    if not (batch.isdigit() and length.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxLENGTH, e.g. 4x1024")
    return int(batch), int(length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("eager", "xla", "cuda"), required=True)
    parser.add_argument("--presets", nargs="+",
                        help="default: sort-tiny and bench (CPU backends), bench and reference "
                             "(CUDA)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="BATCHxLENGTH",
                        help="override every preset's default batch shapes")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loop-steps", type=int,
                        help="steps for the loop baseline (default --steps); on XLA each of its "
                             "steps recompiles, so more steps only repeat the same cost")
    parser.add_argument("--dispatches", nargs="+", default=["loop", "index"],
                        choices=["loop", "index", "grouped"],
                        help="loop: the dynamic baseline (on XLA it recompiles every step; on "
                             "CUDA it runs uncompiled); grouped: dropless grouped matmuls "
                             "(CUDA bf16, eager CPU; not XLA)")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        choices=COMPILE_MODES,
                        help="CUDA: compile modes to compare (compiled dispatches): "
                             "torch.compile's, and step-graph (the whole step as one CUDA graph)")
    args = parser.parse_args()
    loop_steps = args.loop_steps or args.steps
    if min(args.steps, loop_steps) < 3:
        parser.error("--steps and --loop-steps must be at least 3: the first two steps "
                     "(compilation) are not timed")
    if args.backend == "cuda" and not torch.cuda.is_available():
        parser.error("--backend cuda: no CUDA device is available")

    shapes = CUDA_SHAPES if args.backend == "cuda" else SHAPES
    backend = select_backend("cpu" if args.backend == "eager" else args.backend)
    modes = args.compile_modes if args.backend == "cuda" else ["default"]
    for dispatch in set(args.dispatches) - {"loop"}:
        try:
            backend.check_dispatch(dispatch)
        except ValueError as err:
            parser.error(str(err))
    print(f"== train benchmark ({args.backend}): train step tokens/s, index vs dynamic loop")
    for preset in args.presets or list(shapes):  # a results section per preset and shape
        for batch, length in args.shapes or shapes.get(preset, SHAPES["bench"]):
            rows = []
            for dispatch in args.dispatches:
                for mode in (["default"] if dispatch == "loop" else modes):
                    backend.use_compile_mode(mode)
                    steps = loop_steps if dispatch == "loop" else args.steps
                    rows.append(measure(preset, dispatch, backend, steps, batch, length))
                    print(f"  {preset:9s} {batch}x{length} {dispatch:5s} {mode:15s} "
                          f"{rows[-1]['tokens_per_s']:9.0f} tok/s", flush=True)
            loop = next((row for row in rows if row["dispatch"] == "loop"), None)
            for row in rows if loop else []:
                row["speedup_vs_loop"] = row["tokens_per_s"] / loop["tokens_per_s"]
            add_loss_gaps(rows)
            payload = {"machine": machine(), "rows": rows}
            if args.backend == "cuda":
                payload["gpu"] = add_utilisation(rows, backend.device)
            path = update_results("train", f"{args.backend} {preset} {batch}x{length}", payload)
            print(table(rows, CUDA_COLUMNS[:8] + ["speedup_vs_loop"] + CUDA_COLUMNS[8:]
                        if args.backend == "cuda" else COLUMNS))
            print(f"results: {path}")


if __name__ == "__main__":
    main()
