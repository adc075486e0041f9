"""The training loop: data → compiled step → metrics, evaluation and checkpoints.

``TrainConfig`` is the whole run as data (saved as ``OUT/train_config.json``); ``train`` runs it
and returns the path of the final model checkpoint (``OUT/final``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import BiBoConfig, ExecutionOptions
from ..model import BiBoForCausalLM
from ..model.bibo import IGNORE_INDEX
from ..model.checkpoint import load_config
from ..resources import check_training_fits
from .backend import Backend, select_backend
from .checkpointing import load_training_checkpoint, save_training_checkpoint
from .data import DataSource, make_data_source
from .optim import build_optimizer, initialize_state, use_lr_tensor, warmup_cosine
from .parallel import Parallelism
from .run import RunFolder
from .step import TrainStep

# What a resumed run may change: the schedule's length, logging and checkpoint cadence, and
# where it runs. Anything else would make the resumed run a different run.
# Counts (steps, batch sizes, cadences) beyond this are typing mistakes, and past 2**31 some
# index or schedule computation would overflow.
MAX_COUNT = (1 << 31) - 1
RESUMABLE = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "device", "mesh", "compile_mode")


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient norm: the run stops, its last good checkpoint is kept."""


@dataclass
class TrainConfig:
    preset: str = "sort-tiny"
    model_config: str | None = None  # a BiBoConfig JSON file; overrides preset
    capacity_factor: float | None = 1.25  # ExecutionOptions: None never drops
    moe_dispatch: str = "index"  # ExecutionOptions: index | einsum | grouped | dense
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # BiBoConfig fields
    data: str = "sort:8"  # sort[:LENGTHS] | text:PATH | bin:PATH[:uint16|uint32]
    tokenizer: str | None = None  # a tokenizer.json for text: data (else its raw bytes)
    sequence_length: int = 256  # text and bin windows
    steps: int = 600
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 48
    device: str = "auto"
    precision: str = "auto"  # bf16 on TPU/CUDA, fp32 elsewhere
    compile_mode: str = "default"  # how CUDA compiles (backend.COMPILE_MODES)
    mesh: str | None = None  # e.g. "fsdp=4" or "data=2,fsdp=2,expert=2" (torch_xla SPMD)
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        """Refuse values that would train nonsense (or NaN) before anything runs."""
        for name in ("steps", "batch_size", "grad_accum", "sequence_length", "log_every",
                     "eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 1 <= value <= MAX_COUNT:
                raise ValueError(f"{name} must be an integer >= 1 (at most {MAX_COUNT:,}), got "
                                 f"{value!r}")
        for name, low, high in (("lr", 0.0, math.inf), ("grad_clip", 0.0, math.inf),
                                ("weight_decay", 0.0, math.inf), ("warmup_fraction", 0.0, 1.0),
                                ("min_lr_ratio", 0.0, 1.0)):
            value = getattr(self, name)
            inclusive = name in ("weight_decay", "warmup_fraction", "min_lr_ratio")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    not (low <= value if inclusive else low < value) or value > high:
                bounds = f"{'[' if inclusive else '('}{low}, {high}]"
                raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
        if self.tokenizer is not None and not self.data.startswith("text:"):
            raise ValueError(f"a tokenizer goes with --data text:PATH, not {self.data!r}")
        self.execution()  # capacity_factor and moe_dispatch are checked there

    def execution(self) -> ExecutionOptions:
        return ExecutionOptions(self.capacity_factor, self.moe_dispatch)

    def model_config_resolved(self, vocab_size: int) -> BiBoConfig:
        """The model's config; with a tokenizer its vocab_size follows the tokenizer's unless
        a config file or ``--set vocab_size=`` gives one."""
        base = (BiBoConfig.from_file(self.model_config) if self.model_config
                else BiBoConfig.preset(self.preset))
        values = {**base.to_dict(), **self.model_overrides}
        if self.tokenizer and not self.model_config and "vocab_size" not in self.model_overrides:
            values["vocab_size"] = vocab_size
        config = BiBoConfig.from_dict(values)
        if vocab_size > config.vocab_size:
            source = "the tokenizer" if self.tokenizer else "the data"
            raise ValueError(f"{source} has {vocab_size} token ids but the model's vocab_size "
                             f"is {config.vocab_size}")
        return config

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A saved run's config; runs saved before ``moe_dispatch`` existed load too."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def requested_config(out: str | Path, given: dict[str, Any], resume: bool) -> TrainConfig:
    """The config a command line asks for: ``given`` options over the defaults, or, to resume,
    over the run's saved config (so options left out keep their saved values)."""
    run = RunFolder(Path(out))
    if resume and run.train_config_path.is_file():
        return dataclasses.replace(TrainConfig.from_dict(run.read_train_config()), **given)
    return TrainConfig(**given)


def resumed_config(saved: TrainConfig, requested: TrainConfig) -> TrainConfig:
    """The saved run's config with the changes a resume may make (``RESUMABLE``), reported;
    any other difference is refused with one line."""
    changes = {f.name: (getattr(saved, f.name), getattr(requested, f.name))
               for f in dataclasses.fields(TrainConfig)
               if getattr(saved, f.name) != getattr(requested, f.name)}
    refused = sorted(set(changes) - set(RESUMABLE))
    if refused:
        raise ValueError("--resume continues the saved run, whose " + ", ".join(
            f"{name} is {changes[name][0]!r} (not {changes[name][1]!r})" for name in refused)
            + ": drop those options, or start a new run in another --out")
    if changes:
        print("resuming with " + ", ".join(f"{name} {old!r} → {new!r}"
                                           for name, (old, new) in changes.items()), flush=True)
    return requested


class MetricsLog:
    """Appends one JSON object per line to ``OUT/metrics.jsonl`` and mirrors it to the bar."""

    def __init__(self, path: Path, bar: tqdm) -> None:
        self.path, self.bar = path, bar
        self.diverged: str | None = None  # what went non-finite, and at which step

    def write(self, record: dict[str, Any]) -> None:
        bad = [key for key in ("loss", "grad_norm") if key in record
               and not math.isfinite(record[key])]
        if bad and self.diverged is None:
            self.diverged = f"step {record['step']}: {' and '.join(bad)} not finite"
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 drop=f"{record['drop_rate']:.3f}")
        if "eval" in record:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in record["eval"].items())
            self.bar.write(f"step {record['step']}: held-out {scores}")


@torch.no_grad()
def evaluate(model: BiBoForCausalLM, data: DataSource, backend: Backend,
             parallel: Parallelism | None = None) -> dict[str, float]:
    """Held-out loss (and perplexity, or sorting token / full-sequence accuracy)."""
    parallel = parallel or Parallelism()
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=backend.device)  # loss sum, tokens, correct, exact rows
    rows = 0
    for input_ids, labels in data.eval_batches():
        input_ids = parallel.shard_batch(input_ids[None].to(backend.device))[0]
        labels = parallel.shard_batch(labels[None].to(backend.device))[0]
        with backend.autocast():
            logits = model(input_ids).logits
        mask = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        # "The label's logit is the largest" rather than argmax: XLA's SPMD partitioner
        # aborts on the variadic reduce argmax lowers to (torch_xla 2.9).
        label_logit = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        correct = (label_logit >= logits.max(-1).values) & mask
        totals += torch.stack([loss, mask.sum().float(), correct.sum().float(),
                               (correct | ~mask).all(-1).sum().float()])
        rows += input_ids.shape[0]
    model.train(was_training)
    loss_sum, tokens, correct, exact = totals.cpu().tolist()
    scores = {"loss": loss_sum / tokens}
    if data.kind == "sort":
        scores.update(token_accuracy=correct / tokens, sequence_accuracy=exact / rows)
    else:
        scores["perplexity"] = math.exp(min(scores["loss"], 50.0))
    return scores


def train(config: TrainConfig, out: str | Path, resume: bool = False,
          stop_after: int | None = None, overwrite: bool = False) -> Path:
    """Run (or resume) training into ``out``; returns the final checkpoint folder.

    ``stop_after`` ends this invocation after that many steps (the schedule still spans
    ``config.steps``), as an interruption would: ``resume=True`` then continues exactly. A
    resumed run keeps its saved config, except for the ``RESUMABLE`` fields of ``config``.
    ``overwrite`` starts over in a folder that holds anything: it is deleted first.
    """
    run = RunFolder(Path(out))
    latest = run.latest_checkpoint()
    if resume and latest is None:
        raise ValueError(f"nothing to resume: {run.checkpoints} holds no checkpoint")
    if not resume and not overwrite and (latest is not None or run.final.exists()):
        raise ValueError(f"{run.root} already holds a run: pass --resume to continue it, or "
                         "choose another --out")
    if overwrite and not resume and run.root.exists():
        shutil.rmtree(run.root)  # the caller asked to start over: nothing of the old run is read
        latest = None
    if resume:
        config = resumed_config(TrainConfig.from_dict(run.read_train_config()), config)

    parallel = Parallelism.from_spec(config.mesh, config.device)  # before any device exists
    backend = select_backend(config.device, config.precision, spmd=parallel.axes is not None)
    backend.check_dispatch(config.moe_dispatch)
    backend.use_compile_mode(config.compile_mode)
    tokenizer = run.read_tokenizer(config.tokenizer, fresh=latest is None) \
        if config.tokenizer else None
    if tokenizer is not None and latest is None:
        # Refuse a model that cannot hold the tokenizer's ids before tokenizing into the run.
        check_fits(config.sequence_length, "lm",
                   config.model_config_resolved(tokenizer.vocab_size), config)
    data = make_data_source(config.data, config.batch_size, config.seed, config.sequence_length,
                            tokenizer, run.data_cache)
    if latest is None:
        model_config = config.model_config_resolved(data.vocab_size)
        check_fits(data.sequence_length, data.kind, model_config, config)  # before a big model
        check_training_fits(model_config, config.batch_size, data.sequence_length)
        torch.manual_seed(config.seed)
        model, saved_state, start = BiBoForCausalLM(model_config), None, 0
    else:
        check_training_fits(load_config(latest)[0], config.batch_size, data.sequence_length)
        model, saved_state, start = load_training_checkpoint(latest)
        check_fits(data.sequence_length, data.kind, model.config, config)
    print(f"training on {backend.name}{parallel.describe()} "
          f"({'bf16 autocast' if backend.bf16 else 'fp32'}), data {config.data}", flush=True)
    if latest is not None:
        print(f"resuming from {latest} (step {start})", flush=True)

    model.set_execution(config.execution())
    model.gradient_checkpointing = config.gradient_checkpointing
    model = backend.prepare_model(model.to(backend.device).train())
    parallel.shard_model(model)

    lr = torch.zeros((), device=backend.device)
    step_counter = torch.full((), float(start), device=backend.device)
    optimizer = build_optimizer(model, lr, config.weight_decay, backend.device.type)
    if saved_state is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        use_lr_tensor(optimizer, lr)  # the saved copy is a host tensor; the step writes this one
        torch.set_rng_state(saved_state["torch_rng"])
    initialize_state(optimizer)
    backend.sync()  # the state is made in a graph of its own, not in the first step's
    warmup = max(1, int(config.warmup_fraction * config.steps))
    schedule = lambda step: warmup_cosine(step, config.lr, warmup, config.steps,  # noqa: E731
                                          config.min_lr_ratio)
    step_fn = backend.compile_step(TrainStep(model, optimizer, lr, step_counter, schedule,
                                             config.grad_clip, backend.autocast))

    run.root.mkdir(parents=True, exist_ok=True)
    if latest is None:
        run.write_train_config(dataclasses.asdict(config))
        run.metrics_path.unlink(missing_ok=True)
        if tokenizer is not None:
            run.copy_tokenizer(run.root, tokenizer.path)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    tokens_per_step = config.batch_size * config.grad_accum * data.sequence_length
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    log = MetricsLog(run.metrics_path, bar)
    window_start, window_steps = time.perf_counter(), 0

    for step in bar:
        batches = [data.train_batch(step * config.grad_accum + i) for i in range(config.grad_accum)]
        input_ids = parallel.shard_batch(torch.stack([b[0] for b in batches]).to(backend.device))
        labels = parallel.shard_batch(torch.stack([b[1] for b in batches]).to(backend.device))
        metrics = step_fn(input_ids, labels)
        window_steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == end:
            elapsed = time.perf_counter() - window_start
            rate = window_steps * tokens_per_step / elapsed
            window_start, window_steps = time.perf_counter(), 0
            backend.on_host(lambda m, s=done, r=rate: log.write(
                {"step": s, **{k: v.tolist() for k, v in m.items()}, "tokens_per_s": r,
                 **backend.compile_stats()}), metrics)
        backend.sync()  # runs the logging closure on XLA: metrics reach the host here
        checkpoint_due = done % config.checkpoint_every == 0 or done == end
        if checkpoint_due and log.diverged is None:
            check_finite(metrics, done, log)  # saving reads the weights back anyway
        if log.diverged is not None:
            bar.close()
            kept = run.latest_checkpoint()
            raise TrainingDiverged(f"training diverged at {log.diverged}; stopped with no "
                                   f"final/ written; last good checkpoint: {kept or 'none'}")
        if done % config.eval_every == 0 or done == config.steps:
            log.write({"step": done, "eval": evaluate(model, data, backend, parallel)})
        if checkpoint_due:
            save_training_checkpoint(run.checkpoints, done, model, optimizer,
                                     config.keep_checkpoints, run.tokenizer)
    bar.close()

    if end == config.steps:
        run.save_final(model)
        print(f"final checkpoint: {run.final}", flush=True)
        return run.final
    return run.latest_checkpoint()


def check_fits(sequence_length: int, kind: str, model_config: BiBoConfig,
               config: TrainConfig) -> None:
    """Sequences longer than the model's positions would train on positions it never has."""
    limit = model_config.max_position_embeddings
    if sequence_length > limit:
        source = "--sequence-length" if kind == "lm" else f"--data {config.data}"
        raise ValueError(f"{source} gives sequences of {sequence_length} tokens, beyond the "
                         f"model's max_position_embeddings {limit}")


def check_finite(metrics: dict[str, torch.Tensor], step: int, log: MetricsLog) -> None:
    """Before a checkpoint: this step's loss and gradient norm must be finite (a NaN in the
    weights persists, so a finite step means the weights being saved are sound)."""
    values = {key: float(metrics[key].detach().cpu()) for key in ("loss", "grad_norm")}
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:
        log.diverged = f"step {step}: {' and '.join(bad)} not finite"
