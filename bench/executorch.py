"""ExecuTorch benchmark on the `bench` preset: prefill latency, decode speed, sizes, decode cost.

    python -m bench.executorch                 # random-init `bench` model, exported here
    python -m bench.executorch --checkpoint DIR
    python -m bench.executorch --preset sort-tiny --prompt 16   # a quick run

Rows: eager fp32 (the reference), ExecuTorch fp32 and int8 (XNNPACK). Prefill is one call of
T = --prompt tokens at B = 1; decode is tokens/s of single-token steps after that prompt.
Decode weight bytes per token compare what the program reads with the active-parameter minimum.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, table, update_results
from bibo_export.config import BiBoConfig
from bibo_export.export.executorch import export_executorch
from bibo_export.model import BiBoForCausalLM
from bibo_export.runtimes import load
from bibo_export.timing import time_runtime


def random_checkpoint(directory: Path, preset: str) -> Path:
    torch.manual_seed(0)
    BiBoForCausalLM(BiBoConfig.preset(preset)).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: a random-init --preset model")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    max_length = args.prompt + args.decode_steps

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(tmp / "checkpoint", args.preset)
        records = export_executorch(checkpoint, {p: tmp / p for p in ("fp32", "int8")},
                                    max_length=max_length)
        vocab_size = BiBoForCausalLM.from_pretrained(checkpoint).config.vocab_size
        prompt = np.random.default_rng(0).integers(0, vocab_size, (1, args.prompt))
        rows = []
        for name, path in (("eager fp32", checkpoint), ("executorch fp32", tmp / "fp32"),
                           ("executorch int8", tmp / "int8")):
            runtime = load(path)
            print(f"  timing {name} ...", flush=True)
            row = {"runtime": name, **time_runtime(runtime, prompt, args.decode_steps,
                                                   args.repeats)}
            record = records.get(name.split()[-1]) if name.startswith("executorch") else None
            if record is not None:
                weight_bytes = record["decode_weight_bytes_per_token"]
                row.update(bytes=record["total_bytes"], delegate_calls=record["ops"]["delegate_calls"],
                           portable_ops=record["ops"]["portable_ops"],
                           decode_weight_bytes=weight_bytes["touched"],
                           active_minimum_bytes=weight_bytes["active_minimum"],
                           touched_vs_minimum=weight_bytes["touched"]
                           / weight_bytes["active_minimum"],
                           max_abs_vs_eager=record["verification"]["max_abs"])
            rows.append(row)
    rows[2]["size_ratio_int8_fp32"] = rows[2]["bytes"] / rows[1]["bytes"]
    section = "custom" if args.checkpoint else args.preset
    path = update_results("executorch", section, {
        "machine": machine(), "checkpoint": str(args.checkpoint or f"random {args.preset}"),
        "prompt_tokens": args.prompt, "batch_size": 1,
        "decode_steps": args.decode_steps, "rows": rows})
    print(table(rows, ["runtime", "prefill_ms", "decode_tok_s", "bytes", "size_ratio_int8_fp32",
                       "decode_weight_bytes", "active_minimum_bytes", "touched_vs_minimum",
                       "delegate_calls", "portable_ops", "max_abs_vs_eager"]))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
