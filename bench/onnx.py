"""ONNX benchmark on the `bench` preset (random weights): eager fp32 vs ORT fp32, int8 and int4
(``decode_vs_int8``: int4's decode speed over int8's, same run).

    python -m bench.onnx [--threads 1] [--prompt 128] [--new-tokens 32]

Measures prefill latency (B=1, T=--prompt), decode tokens/s (B=1, through the cache: the median
step, each step timed alone, after a 16-token prompt), the same
for int8 exported at the CLI's default maximum length (``--long-max-length``: a longer static
cache, which a decode step must not pay for), artifact sizes, the weight bytes each decode step
actually reads (ORT's profiler: nodes in untaken ``If`` branches never run) against the
active-parameter minimum, and a memory-bandwidth roofline measured on this machine in the same
run. Runtimes are timed in alternating rounds (medians), so the machine's drift hits every row
alike. Writes bench/results/onnx.json.

The row "ort int8 kernels alone" times a graph of only the int8 program's integer kernels
(``integer_kernels_alone``): the bandwidth at which ORT's kernels stream the weights with nothing
else in the step, so the share of the roofline that no change to the rest of the graph can
exceed. The row "ort int8, experts skipped" times the int8 program with every QMoE node given
zero routing weights (``experts_skipped``): the int8 row's ``experts_share`` is the part of its
decode step that the experts take.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.common import interleaved_medians, machine, table, update_results
from bibo_export.config import BiBoConfig
from bibo_export.artifacts import ONNX_DATA_FILE, ONNX_FILE
from bibo_export.export.onnx import (INTEGER_OPS, QMOE_ROUTER_WEIGHTS, export_onnx, tensor_bytes,
                                     weights_read_per_call)
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes.base import Runtime
from bibo_export.runtimes.eager import EagerRuntime
from bibo_export.runtimes.onnx import OnnxRuntime
from bibo_export.threads import use_threads
from bibo_export.timing import median_seconds, time_runtime


PRECISIONS = ("fp32", "int8", "int4")
# The active minimum's bytes per weight: int4 is half a byte (its scales are not counted).
BYTES_PER_WEIGHT = {"fp32": 4, "int8": 1, "int4": 0.5}
KERNELS_ROW = "ort int8 kernels alone"
EXPERTS_SKIPPED_ROW = "ort int8, experts skipped"


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large single-threaded memory copy (read + write), best of ``repeats``."""
    src = np.ones(megabytes << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(median_seconds(lambda: np.copyto(dst, src), 1, warmup=1) for _ in range(repeats))
    return 2 * src.nbytes / best


def active_parameter_bytes(model: BiBoForCausalLM, bytes_per_weight: float) -> int:
    """Weights one decoded token needs at least: everything but the routed experts and the
    embedding table, plus one embedding row and k MLP experts per MoE layer."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for moe in model.moe_layers for p in moe.experts.parameters())
    per_expert = experts // (len(model.moe_layers) * config.num_mlp_experts)
    active = (total - experts - model.embed_tokens.weight.numel() + config.hidden_size
              + len(model.moe_layers) * config.num_experts_per_tok * per_expert)
    return round(active * bytes_per_weight)


def integer_kernels_alone(program: onnx.ModelProto) -> onnx.ModelProto:
    """The integer kernels (``INTEGER_OPS``) of ``program``'s top-level graph alone, with their
    weights: each tensor they read that no weight holds (activations, QMoE's routing) is a
    graph input under its own name, and their outputs are the graph's outputs."""
    initializers = {init.name: init for init in program.graph.initializer}
    kernels = [node for node in program.graph.node if node.op_type in INTEGER_OPS]
    read = {name for node in kernels for name in node.input if name}
    inputs = sorted(read - set(initializers))
    graph = onnx.helper.make_graph(
        kernels, "integer_kernels_alone",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in inputs],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
         for node in kernels],
        [initializers[name] for name in sorted(read & set(initializers))])
    return onnx.helper.make_model(graph, opset_imports=program.opset_import,
                                  ir_version=program.ir_version)


def experts_skipped(folder: Path, out: Path) -> Path:
    """A copy at ``out`` of the int8 export ``folder`` whose QMoE nodes get their routing weights
    multiplied by 0, so that they run no expert (their CPU kernel skips an expert whose weight
    is 0): the same step otherwise, to time beside the program."""
    model = onnx.load(folder / ONNX_FILE, load_external_data=False)
    zero = "bench.zero"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), zero))
    nodes = []
    for node in model.graph.node:
        if node.op_type == "QMoE":
            routing = node.input[QMOE_ROUTER_WEIGHTS]
            nodes.append(onnx.helper.make_node("Mul", [routing, zero], [f"{routing}.zeroed"]))
            node.input[QMOE_ROUTER_WEIGHTS] = f"{routing}.zeroed"
        nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    out.mkdir()
    onnx.save_model(model, out / ONNX_FILE)  # the weights stay in the data file, copied as is
    shutil.copyfile(folder / ONNX_DATA_FILE, out / ONNX_DATA_FILE)  # ORT refuses a link outside
    return out


class KernelsAlone:
    """A session over ``integer_kernels_alone`` of an int8 folder, fed one token: random
    activations, and each QMoE node routed to ``top_k`` of its MLP experts at weight 1/k (the
    most a token reads: chosen parameter-free experts read nothing). ``bytes_per_call``: the
    weights one call reads, counted as ``weights_read_per_call`` counts them."""

    def __init__(self, folder: Path, top_k: int, options: ort.SessionOptions) -> None:
        graph = integer_kernels_alone(onnx.load(folder / ONNX_FILE))
        self.session = ort.InferenceSession(graph.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        weights = {init.name: init for init in graph.graph.initializer}
        self.feeds: dict[str, np.ndarray] = {}
        self.bytes_per_call = 0
        for node in graph.graph.node:
            read = sum(tensor_bytes(weights[name]) for name in node.input if name in weights)
            if node.op_type == "MatMulNBits":
                width = onnx.helper.get_node_attr_value(node, "K")
                self.feeds[node.input[0]] = rng.standard_normal((1, 1, width), np.float32)
                self.bytes_per_call += read
                continue
            experts, _, hidden = weights[node.input[2]].dims  # fc1, 8-bit: [E, 2·width, hidden]
            gates = np.zeros((1, experts), np.float32)
            gates[0, rng.choice(experts, min(top_k, experts), replace=False)] = 1 / top_k
            self.feeds[node.input[0]] = rng.standard_normal((1, hidden), np.float32)
            self.feeds[node.input[1]] = self.feeds[node.input[QMOE_ROUTER_WEIGHTS]] = gates
            self.bytes_per_call += read * min(top_k, experts) // experts

    def call_seconds(self, repeats: int = 50) -> float:
        return median_seconds(lambda: self.session.run(None, self.feeds), repeats)


def folder_bytes(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and ORT alike (default 1: fair on a shared box)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating rounds, each timing every runtime once (medians)")
    parser.add_argument("--long-max-length", type=int, default=2048,
                        help="also time int8 exported at this maximum length (0: skip)")
    args = parser.parse_args()
    use_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    max_length = args.prompt + args.new_tokens

    print(f"== ONNX benchmark: `bench` preset, random weights, {args.threads} thread(s)")
    torch.manual_seed(0)
    model = BiBoForCausalLM(BiBoConfig.preset("bench")).eval()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, (1, args.prompt), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "checkpoint")
        start = time.perf_counter()
        manifests = export_onnx(tmp / "checkpoint", {p: tmp / p for p in PRECISIONS},
                                max_length=max_length)
        export_seconds = time.perf_counter() - start
        runtimes: dict[str, Runtime] = {"eager fp32": EagerRuntime(model, max_length)}
        sizes = {"eager fp32": folder_bytes(tmp / "checkpoint", "model")}
        for precision in PRECISIONS:
            runtimes[f"ort {precision}"] = OnnxRuntime.from_path(tmp / precision, options=options)
            sizes[f"ort {precision}"] = folder_bytes(tmp / precision, "model")
        if args.long_max_length > max_length:
            long_name = f"ort int8 (max length {args.long_max_length})"
            export_onnx(tmp / "checkpoint", {"int8": tmp / "int8-long"},
                        max_length=args.long_max_length)
            runtimes[long_name] = OnnxRuntime.from_path(tmp / "int8-long", options=options)
            sizes[long_name] = folder_bytes(tmp / "int8-long", "model")
        decode_prompt = prompt[:, :16]
        read = {f"ort {p}": weights_read_per_call(tmp / p, decode_prompt, 9)[1:]
                for p in PRECISIONS}
        bandwidth = copy_bandwidth()
        minimum = {p: active_parameter_bytes(model, BYTES_PER_WEIGHT[p]) for p in PRECISIONS}

        kernels = KernelsAlone(tmp / "int8", model.config.num_experts_per_tok, options)
        skipped = OnnxRuntime.from_path(experts_skipped(tmp / "int8", tmp / "int8-skipped"),
                                        check=False, options=options)

        def measure(subject: Runtime | KernelsAlone) -> dict[str, float]:
            if isinstance(subject, KernelsAlone):
                return {"kernels_ms": subject.call_seconds() * 1e3}
            return {"prefill_ms": median_seconds(lambda: subject.logits(prompt), 1) * 1e3,
                    "decode_tok_s": time_runtime(subject, decode_prompt, args.new_tokens,
                                                 repeats=1)["decode_tok_s"]}

        timings = interleaved_medians(
            measure, {**runtimes, EXPERTS_SKIPPED_ROW: skipped, KERNELS_ROW: kernels},
            args.repeats)
        rows = []
        for name, runtime in runtimes.items():
            precision = name.split()[1]  # "ort int8 (max length N)" → int8
            row = dict(runtime=name, **timings[name], artifact_mb=sizes[name] / 1e6,
                       min_active_mb=minimum[precision] / 1e6)
            if name in read:
                per_token = float(np.mean([sum(call.values()) for call in read[name]]))
                row.update(read_mb_per_token=per_token / 1e6,
                           read_vs_min=per_token / minimum[precision],
                           roofline_tok_s=bandwidth / per_token,
                           roofline_share=row["decode_tok_s"] * per_token / bandwidth)
            rows.append(row)
        int8 = next(row for row in rows if row["runtime"] == "ort int8")
        int4 = next(row for row in rows if row["runtime"] == "ort int4")
        int4["decode_vs_int8"] = int4["decode_tok_s"] / int8["decode_tok_s"]
        without = timings[EXPERTS_SKIPPED_ROW]
        int8["experts_share"] = 1 - int8["decode_tok_s"] / without["decode_tok_s"]
        rows.append(dict(runtime=EXPERTS_SKIPPED_ROW, **without))
        kernels_rate = kernels.bytes_per_call / (timings[KERNELS_ROW]["kernels_ms"] / 1e3)
        rows.append(dict(runtime=KERNELS_ROW, **timings[KERNELS_ROW],
                         read_mb_per_token=kernels.bytes_per_call / 1e6,
                         kernels_gb_s=kernels_rate / 1e9, roofline_share=kernels_rate / bandwidth))
    payload = {"machine": machine(), "threads": args.threads, "prompt": args.prompt,
               "new_tokens": args.new_tokens, "copy_bandwidth_gb_s": bandwidth / 1e9,
               "export_seconds": export_seconds, "rows": rows,
               "int8_size_ratio": sizes["ort int8"] / sizes["ort fp32"],
               "int4_size_ratio": sizes["ort int4"] / sizes["ort fp32"],
               "verification": {p: m["verification"] for p, m in manifests.items()},
               "quantized_weights": {group: len(names) for group, names in
                                     manifests["int8"]["quantization"]["quantized_weights"]
                                     .items()}}
    path = update_results("onnx", "bench", payload)
    print(table(rows, ["runtime", "prefill_ms", "decode_tok_s", "decode_vs_int8", "artifact_mb",
                       "min_active_mb",
                       "read_mb_per_token", "read_vs_min", "roofline_tok_s", "roofline_share",
                       "experts_share", "kernels_ms", "kernels_gb_s"]))
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; int8/fp32 size "
          f"{payload['int8_size_ratio']:.3f}, int4/fp32 {payload['int4_size_ratio']:.3f}; "
          f"results: {path}")


if __name__ == "__main__":
    main()
