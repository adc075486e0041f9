"""The ``bibo-export`` command line. Each subcommand is a thin layer over the package."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .artifacts import (CONFIG_FILE, EXPERT_MODES, INT4_GROUP_SIZE, INT4_GROUP_SIZES, PRECISIONS,
                        TOKENIZER_FILE, WEIGHTS_FILE, artifact_kind, tokenizer_beside)
from .config import DISPATCH_MODES, PRESETS, BiBoConfig
from .export.pipeline import check_max_length, check_outputs
from .logs import filtered_native_stderr, silence_known_noise
from .model import BiBoForCausalLM
from .model.checkpoint import load_config
from .model.reference import import_reference
from .outputs import Output, OutputRefused, claimed_outputs, is_protected
from .parity import run_parity
from .report import markdown_table, sorting_examples, text_examples, write_report
from .runtimes import load
from .runtimes.cpp_runner import run_cpp_runner
from .tasks.sorting import SortingTask, parse_sort_spec
from .threads import thread_share, use_thread_share
from .timing import time_runtime
from .tokenizer import END_OF_TEXT, TextTokenizer, train_tokenizer
from .train.backend import COMPILE_MODES, describe_auto_device
from .train.run import RunFolder
from .train.trainer import TrainConfig, requested_config, train


def cmd_config(args: argparse.Namespace) -> None:
    """Print a preset's or a file's config with every derived value resolved."""
    config = BiBoConfig.from_file(args.config) if args.config else BiBoConfig.preset(args.preset)
    print(config.to_json())


# Spellings of the precision that --precision replaced, and what to write instead.
RETIRED_PRECISION_FLAGS = {"int8": "--int8 is now --precision int8",
                           "int8_out": "--int8-out DIR is now --precision fp32,int8",
                           "dtype": "--dtype bf16 is now --precision bf16"}


def parse_precisions(text: str) -> list[str]:
    """--precision's comma-separated list, in order, each once."""
    precisions = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown or len(set(precisions)) < len(precisions):
        raise argparse.ArgumentTypeError(
            f"expected distinct precisions among {', '.join(PRECISIONS)}, comma-separated, "
            f"got {text!r}")
    return precisions


def export_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """--out DIR and --precision: one folder per precision, DIR/PRECISION, checked
    (``check_outputs``)."""
    for flag, message in RETIRED_PRECISION_FLAGS.items():
        if getattr(args, flag, None) is not None:
            raise ValueError(f"{message} (each precision is written to --out/PRECISION)")
    if "bf16" in args.precision and args.format != "executorch":
        raise ValueError("--precision bf16 is ExecuTorch's only: ONNX exports fp32, int8, int4")
    out = Path(args.out)
    if out.suffix in (".pte", ".onnx") or (out.exists() and not out.is_dir()):
        raise ValueError(f"the output must be a folder (it receives a folder per precision, "
                         f"each with the model file and its manifest), got {out}")
    checkpoint, resolved = Path(args.checkpoint).resolve(), out.resolve()
    if checkpoint == resolved or checkpoint in resolved.parents:
        raise OutputRefused(f"--out {out} is or is inside the input {args.checkpoint}: "
                            "choose a folder outside it")
    if is_protected(resolved):  # its precision folders would land beside the user's own
        raise OutputRefused(f"--out {out} is a filesystem root or the home folder: choose a "
                            "folder inside it")
    return check_outputs({precision: out / precision for precision in args.precision})


# Each exporter is imported once its arguments are checked: onnx and executorch exist in the
# export environment only, and importing them takes seconds (6 s for executorch on 2 cores)
# that a mistyped path should not wait for.
def cmd_export_onnx(args: argparse.Namespace) -> None:
    """Export a checkpoint to ONNX (one prefill/decode graph, explicit cache I/O), verified."""
    checkpoint, outs = export_inputs(args)
    from .export.onnx import export_onnx

    export_onnx(checkpoint, outs, args.max_length, group_size=args.group_size)


def cmd_export_executorch(args: argparse.Namespace) -> None:
    """Export a checkpoint to ExecuTorch (XNNPACK, cache in mutable buffers), verified."""
    checkpoint, outs = export_inputs(args)
    from .export.executorch import export_executorch

    export_executorch(checkpoint, outs, args.max_length, experts=args.experts,
                      group_size=args.group_size)


def export_output_folders(args: argparse.Namespace) -> list[Output]:
    checkpoint = (Path(args.checkpoint),)
    return [Output(out, args.format, checkpoint) for out in export_outputs(args).values()]


def export_inputs(args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The checkpoint folder and the output folders of an export command, refused before an
    exporter spends time on them, as is a --max-length the checkpoint's model cannot hold."""
    checkpoint = checkpoint_folder(args.checkpoint)
    check_max_length(load_config(checkpoint)[0], args.max_length)
    return checkpoint, export_outputs(args)


def checkpoint_folder(path: str) -> Path:
    """Refuse what is not a checkpoint before an exporter or parity spends time on it."""
    if not Path(path).exists():
        raise ValueError(f"checkpoint not found: {path}")
    if artifact_kind(path) != "checkpoint":
        raise ValueError(f"{path} is not a checkpoint folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return Path(path)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(token) for token in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    """Greedy generation with any runtime: a checkpoint, an ONNX or an ExecuTorch export."""
    if args.llm_runner and args.runner != "python":
        raise ValueError("--llm-runner and --runner choose the runner twice: choose one")
    tokenizer = None
    if args.prompt is None:
        if args.llm_runner:
            raise ValueError("--llm-runner takes text (--prompt): ExecuTorch's runner tokenizes "
                             "it with the program's tokenizer.json")
        ids = parse_ids(args.prompt_ids)
    else:
        path = tokenizer_beside(args.model)
        if path is None:
            raise ValueError(f"{args.model} holds no {TOKENIZER_FILE}: give --prompt-ids instead")
        tokenizer = TextTokenizer.from_file(path)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt is empty")
    if args.llm_runner:
        name, text = llm_runner_continuation(args)
        print(f"{name}: {json.dumps(args.prompt + text, ensure_ascii=False)}")
        return
    for name, new, measured in generations(args, ids):
        if tokenizer is None:
            shown = f"prompt {','.join(map(str, ids))} -> {','.join(map(str, new))}"
        else:  # one line per runtime (escapes shown as JSON does): they compare line by line
            text = tokenizer.decode(truncate_at(list(new), tokenizer.eos_id))
            shown = json.dumps(args.prompt + text, ensure_ascii=False)
        print(f"{name}: {shown}{measured}")


def generations(args: argparse.Namespace,
                ids: list[int]) -> list[tuple[str, Sequence[int], str]]:
    """(label, new tokens, timings or "") for each runner ``--runner`` asks for. bibo-export's
    own runtime alone keeps its plain line; beside the C++ runner both say how fast they ran."""
    prompt = np.array([ids], dtype=np.int64)
    runtime = load(args.model)
    if args.runner == "python":
        new = runtime.generate(prompt, args.max_new_tokens)[0][len(ids):]
        return [(runtime.name if args.prompt is None else f"{runtime.name} {runtime.precision}",
                 new.tolist(), "")]
    if runtime.name != "executorch":
        raise ValueError(f"--runner {args.runner} runs ExecuTorch programs; {args.model} is not "
                         "one")
    if args.max_new_tokens < 2:
        raise ValueError("--runner cpp and both time decode steps: --max-new-tokens must be >= 2")
    runtime.check_input_ids(prompt, args.max_new_tokens)  # the runner's own checks are terser
    lines = []
    if args.runner == "both":
        new = runtime.generate(prompt, args.max_new_tokens)[0][len(ids):]
        speed = time_runtime(runtime, prompt, args.max_new_tokens, repeats=3)
        lines.append((f"executorch {runtime.precision} python", new.tolist(),
                      speed_note(speed["prefill_ms"], speed["decode_tok_s"])))
    cpp = run_cpp_runner(args.model, [ids], args.max_new_tokens, threads=thread_share())
    lines.append((f"executorch {runtime.precision} c++ runner", cpp.tokens[0],
                  speed_note(cpp.prefill_ms, cpp.decode_tok_s, cpp.int8_path)))
    return lines


def speed_note(prefill_ms: float, decode_tok_s: float, int8_path: str = "") -> str:
    kernels = f", int8 kernels {int8_path}" if int8_path else ""
    return f" (prefill {prefill_ms:.2f} ms, decode {decode_tok_s:,.0f} tokens/s{kernels})"


def llm_runner_continuation(args: argparse.Namespace) -> tuple[str, str]:
    """(label, continuation) of ExecuTorch's TextLLMRunner on an ExecuTorch export."""
    from .runtimes.llm_runner import TextRunner  # executorch is in the export env only

    if artifact_kind(args.model) != "executorch":
        raise ValueError(f"--llm-runner runs ExecuTorch programs; {args.model} is not one")
    precision = load(args.model).precision
    return (f"executorch-llm-runner {precision}",
            TextRunner(args.model).generate(args.prompt, args.max_new_tokens))


def truncate_at(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` up to (without) the first end-of-text token: greedy decoding stops there."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face tokenizers) → DIR/tokenizer.json."""
    kind, _, corpus = args.data.partition(":")
    if kind != "text" or not corpus:
        raise ValueError(f"--data must be text:PATH, got {args.data!r}")
    tokenizer = train_tokenizer(corpus, args.vocab_size, args.out)
    print(f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} tokens, end of text "
          f"{END_OF_TEXT} = id {tokenizer.eos_id})")


def tokenizer_output_folders(args: argparse.Namespace) -> list[Output]:
    corpus = args.data.partition(":")[2]
    return [Output(Path(args.out), "tokenizer", (Path(corpus),) if corpus else ())]


def cmd_parity(args: argparse.Namespace) -> int:
    """Compare artifacts with eager on a checkpoint (docs/parity.md bars); exit 1 if a bar fails."""
    checkpoint = checkpoint_folder(args.checkpoint)
    run = RunFolder.of_checkpoint(checkpoint)
    if args.data is not None:
        lengths = parse_sort_spec(args.data)
        if lengths is None:
            raise ValueError(f"--data must be a sort[:LENGTHS] spec, got {args.data!r}")
        task = SortingTask(lengths=lengths)
    else:
        task = run.task() if run else None
    text = run.held_out_text() if run and task is None else None
    result = run_parity(checkpoint, args.artifacts, task=task, speed=not args.no_speed, text=text)
    decode = None
    if text is not None and tokenizer_beside(checkpoint):
        tokenizer = TextTokenizer.from_file(tokenizer_beside(checkpoint))
        decode = tokenizer.decode
    print(markdown_table(result["rows"]))
    if result["task"] is not None:
        print("\nHeld-out sorting examples (greedy):\n" + sorting_examples(result))
    if decode is not None:
        print("\nHeld-out text continuations (greedy):\n" + text_examples(result, decode))
    if args.report:
        metrics = run.metrics_path if run else None
        print(f"report: {write_report(result, Path(args.report), metrics, decode)}")
    failures = [f"{row['runtime']} {row['precision']} ({row['path']}): "
                + "; ".join(row["failed_bars"]) for row in result["rows"][1:]
                if not row["passed"]]
    for failure in failures:
        print(f"bibo-export parity: FAILED {failure}", file=sys.stderr)
    if not failures:
        print(f"parity: every bar met by {len(result['rows']) - 1} artifact(s)")
    return 1 if failures else 0


def parity_output_folders(args: argparse.Namespace) -> list[Output]:
    inputs = tuple(Path(path) for path in (args.checkpoint, *args.artifacts))
    return [Output(Path(args.report), "report", inputs, flag="--report")] if args.report else []


def import_output_folders(args: argparse.Namespace) -> list[Output]:
    return [Output(Path(args.out), "checkpoint", (Path(args.source),))]


def cmd_import_reference(args: argparse.Namespace) -> None:
    """Convert a checkpoint saved by the original BiBo code into a bibo-export checkpoint."""
    model = import_reference(args.source, args.out)
    config = model.config
    print(f"imported {args.source} -> {args.out}: {model.num_parameters() / 1e6:.2f}M "
          f"parameters, {config.num_hidden_layers} layers ({len(model.moe_layers)} MoE), "
          f"router {config.router_type}, SSMax {'on' if config.use_ssmax else 'off'}")


def cmd_info(args: argparse.Namespace) -> None:
    """Describe a checkpoint: size, layers, experts and the router's balancing state."""
    model = BiBoForCausalLM.from_pretrained(args.checkpoint)
    config = model.config
    print(f"{args.checkpoint}: {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{config.num_hidden_layers} layers ({len(model.moe_layers)} MoE), "
          f"{config.num_routed_experts} experts, top-{config.num_experts_per_tok}, "
          f"router {config.router_type}")
    for i, moe in enumerate(model.moe_layers):
        bias = ", ".join(f"{b:+.3f}" for b in moe.expert_bias.tolist())
        print(f"  moe layer {i}: router bias [{bias}]")


def cmd_device(args: argparse.Namespace) -> None:
    """Print the device that train --device auto picks on this machine, and why."""
    print(f"training device: {describe_auto_device()}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train BiBo (torch_xla on TPU or its CPU backend; eager CPU; CUDA) with checkpoints."""
    given = {k: v for k, v in vars(args).items()
             if k in {f.name for f in dataclasses.fields(TrainConfig)} and v is not None}
    if args.config:
        given["model_config"] = args.config
    if args.set:
        given["model_overrides"] = dict(parse_assignment(item) for item in args.set)
    config = requested_config(args.out, given, args.resume)
    train(config, args.out, resume=args.resume, stop_after=args.stop_after,
          overwrite=args.overwrite)


def train_output_folders(args: argparse.Namespace) -> list[Output]:
    """The run folder: a fresh run replaces only a run that trained nothing yet."""
    data_path = Path(args.data.split(":")[1]) if args.data and ":" in args.data and \
        not args.data.startswith("sort") else None
    inputs = tuple(Path(p) for p in (args.config, args.tokenizer, data_path) if p)
    run = RunFolder(Path(args.out))
    trained = run.final.exists() or run.latest_checkpoint() is not None
    return [Output(Path(args.out), "run", inputs, replaces_same_kind=not trained,
                   checked=not args.resume, keep_hint="pass --resume to continue it, ")]


def parse_assignment(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, null, lists), else text."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes print one line, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="bibo-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    p = sub.add_parser("config", help=cmd_config.__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="sort-tiny", choices=sorted(PRESETS))
    source.add_argument("--config", help="a config JSON file")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help=cmd_train.__doc__,
                       description="Unset options take TrainConfig's defaults (a resumed run "
                                   "keeps its saved config; --steps may extend it).")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=sorted(PRESETS))
    model.add_argument("--config", help="a BiBoConfig JSON file")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, final/")
    p.add_argument("--steps", type=int, help="total optimizer steps of the schedule")
    p.add_argument("--data", help="sort[:LENGTHS] | text:PATH | bin:PATH[:uint16|uint32]")
    p.add_argument("--tokenizer", help="a tokenizer.json for text: data (default: raw bytes, "
                                       "vocabulary 257); vocab_size follows it unless set")
    p.add_argument("--device", choices=["auto", "xla", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile-mode", dest="compile_mode", choices=COMPILE_MODES,
                   help="how --device cuda compiles: a torch.compile mode (default: torch's "
                        "default; reduce-overhead replays the forward and backward as CUDA "
                        "graphs) or step-graph (the whole step, AdamW included, replayed as "
                        "one CUDA graph)")
    p.add_argument("--mesh", help="SPMD mesh, e.g. fsdp=4 or data=2,fsdp=2,expert=2")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-fraction", dest="warmup_fraction", type=float,
                   help="share of the steps spent warming the learning rate up (default 0.1)")
    p.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float,
                   help="the cosine schedule ends at lr × this (default 0.1)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW's (default 0.01)")
    p.add_argument("--sequence-length", dest="sequence_length", type=int)
    p.add_argument("--capacity-factor", dest="capacity_factor", type=float,
                   help="expert capacity during training (default 1.25; at least "
                        "experts / top-k never drops, as --moe-dispatch grouped never does)")
    p.add_argument("--moe-dispatch", dest="moe_dispatch", choices=DISPATCH_MODES,
                   help="MoE formulation during training (default index)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set vocab_size=257 (repeatable)")
    p.add_argument("--log-every", dest="log_every", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--stop-after", dest="stop_after", type=int,
                   help="end this invocation after N steps (resume later)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out even when it holds a trained run or other files "
                        "(they are deleted)")
    p.set_defaults(func=cmd_train, outputs=train_output_folders)

    p = sub.add_parser("tokenizer", help="train a tokenizer for text data")
    actions = p.add_subparsers(dest="action", required=True, parser_class=OneLineErrors)
    q = actions.add_parser("train", help=cmd_tokenizer_train.__doc__)
    q.add_argument("--data", required=True, help="text:PATH, a file or a folder of text files")
    q.add_argument("--vocab-size", dest="vocab_size", type=int, required=True,
                   help=f"tokens, at least 257 (256 bytes + {END_OF_TEXT})")
    q.add_argument("--out", required=True, metavar="DIR", help="receives tokenizer.json")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds something other than an earlier "
                        "output of this command")
    q.set_defaults(func=cmd_tokenizer_train, outputs=tokenizer_output_folders)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or ExecuTorch")
    formats = p.add_subparsers(dest="format", required=True, parser_class=OneLineErrors)
    for name, func, files in [
            ("onnx", cmd_export_onnx, "model.onnx, model.onnx.data, manifest.json"),
            ("executorch", cmd_export_executorch, "model.pte, manifest.json")]:
        q = formats.add_parser(name, help=func.__doc__)
        q.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. runs/sort-tiny/final)")
        precisions = "fp32, bf16, int8, int4" if name == "executorch" else "fp32, int8, int4"
        q.add_argument("--out", required=True, metavar="DIR",
                       help=f"receives one folder per precision, DIR/PRECISION ({files})")
        q.add_argument("--precision", type=parse_precisions, default=["fp32"],
                       metavar="P[,P...]",
                       help=f"{precisions}; several, comma-separated, share the stages before "
                            f"quantization (default fp32; the routers always stay float)")
        q.add_argument("--group-size", dest="group_size", type=int, choices=INT4_GROUP_SIZES,
                       default=INT4_GROUP_SIZE,
                       help=f"int4: weights per scale along a row (default {INT4_GROUP_SIZE})")
        for flag, dest in (("--int8", "int8"), ("--int8-out", "int8_out"), ("--dtype", "dtype")):
            q.add_argument(flag, dest=dest, nargs="?", const="", help=argparse.SUPPRESS)
        q.add_argument("--max-length", dest="max_length", type=int,
                       help="prompt + generated tokens the cache holds (default: the model's maximum)")
        if name == "executorch":
            q.add_argument("--experts", choices=EXPERT_MODES, default="selected",
                           help="selected: a token reads only the experts it chose (BiBo's "
                                "kernel library, built by make setup, must be linked where "
                                "the program runs); fused: every expert, ExecuTorch's own "
                                "kernels only (bf16 programs are always fused)")
        q.add_argument("--overwrite", action="store_true",
                       help="replace a precision's folder even when it holds something other "
                            "than an earlier output of this command")
        q.set_defaults(func=func, outputs=export_output_folders)

    p = sub.add_parser("import", help="import a checkpoint written by other code")
    sources = p.add_subparsers(dest="source_format", required=True, parser_class=OneLineErrors)
    q = sources.add_parser("reference", help=cmd_import_reference.__doc__)
    q.add_argument("source", help="the original's save_pretrained folder (config.json + "
                                  "model.safetensors, or shards with model.safetensors.index.json)")
    q.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds something other than an earlier "
                        "output of this command")
    q.set_defaults(func=cmd_import_reference, outputs=import_output_folders)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("--model", required=True,
                   help="a checkpoint folder, an ONNX or ExecuTorch export folder, or a .pte")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, for a model that holds its tokenizer.json")
    prompt.add_argument("--prompt-ids", dest="prompt_ids", help="token ids, e.g. 3,1,2,255")
    p.add_argument("--llm-runner", dest="llm_runner", action="store_true",
                   help="with --prompt and an ExecuTorch export: generate with ExecuTorch's own "
                        "TextLLMRunner (C++) instead of bibo-export's runtime")
    p.add_argument("--runner", choices=("python", "cpp", "both"), default="python",
                   help="for an ExecuTorch export: bibo-export's Python runtime (default), BiBo's "
                        "C++ runner (make setup builds it), or both, each line with its prefill "
                        "time and decode tokens/s")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=16)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help=cmd_parity.__doc__)
    p.add_argument("--checkpoint", required=True, help="the eager reference (a checkpoint folder)")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help="export folders (ONNX, ExecuTorch), .pte files or checkpoint folders")
    p.add_argument("--data", help="sort[:LENGTHS] for sorting accuracy (default: the training "
                                  "run's data, read from train_config.json beside the checkpoint)")
    p.add_argument("--report", metavar="DIR",
                   help="also write DIR/report.md, report.json and training plots")
    p.add_argument("--no-speed", dest="no_speed", action="store_true",
                   help="skip the prefill/decode timings")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --report's folder even when it holds something other than an "
                        "earlier report")
    p.set_defaults(func=cmd_parity, outputs=parity_output_folders)

    p = sub.add_parser("device", help=cmd_device.__doc__)
    p.set_defaults(func=cmd_device)

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("checkpoint", help="a folder with config.json and model.safetensors")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_known_noise()
    with filtered_native_stderr():
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int | None] = args.func
    outputs: Callable[[argparse.Namespace], list[Output]] = getattr(args, "outputs",
                                                                   lambda _: [])
    try:
        use_thread_share()  # beside other jobs of ours (make's lanes, test workers): a share
        with claimed_outputs(outputs(args), getattr(args, "overwrite", False)):
            status = func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one line, no traceback.
        print(f"bibo-export {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (``| head``): what it wanted, it has
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process that SIGPIPE ended
    except ModuleNotFoundError as err:  # e.g. an export run from .venv-xla
        print(f"bibo-export {args.command}: error: {err.name} is not installed in this "
              "environment (training runs in .venv-xla, export and runtimes in .venv)",
              file=sys.stderr)
        return 2
    except Exception as err:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"bibo-export {args.command}: error: no space left on the device while "
                  f"writing {err.filename or 'an output'}", file=sys.stderr)
            return 1
        return report_unexpected(args.command, err)
    return status


def report_unexpected(command: str, err: Exception) -> int:
    """A bug or an environment problem: one line, and the traceback in a log file
    (``BIBO_DEBUG=1`` raises it instead)."""
    if os.environ.get("BIBO_DEBUG") == "1":
        raise err
    log = Path(tempfile.gettempdir()) / f"bibo-export-{time.strftime('%Y%m%d-%H%M%S')}-" \
        f"{os.getpid()}.log"
    log.write_text(traceback.format_exc())
    first = (str(err).strip().splitlines() or [""])[0]
    print(f"bibo-export {command}: error: unexpected {type(err).__name__}"
          f"{': ' + first if first else ''} (traceback in {log}; BIBO_DEBUG=1 prints it)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
