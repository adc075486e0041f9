"""The training loop: data → compiled step → metrics, evaluation and checkpoints.

``TrainConfig`` is the whole run as data (saved as ``OUT/train_config.json``); ``train`` runs it
and returns the path of the final model checkpoint (``OUT/final``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import BiBoConfig
from ..io import atomic_write_text
from ..model import BiBoForCausalLM
from ..model.bibo import IGNORE_INDEX
from .backend import Backend, select_backend
from .checkpointing import checkpoint_dirs, load_training_checkpoint, save_training_checkpoint
from .data import DataSource, make_data_source
from .optim import build_optimizer, use_lr_tensor, warmup_cosine
from .parallel import Parallelism
from .step import TrainStep


@dataclass
class TrainConfig:
    preset: str = "sort-tiny"
    model_config: str | None = None  # a BiBoConfig JSON file; overrides preset
    capacity_factor: float | None = 1.25  # overrides the model's; None keeps the model's value
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # BiBoConfig fields
    data: str = "sort:8"  # sort[:LENGTHS] | text:PATH | bin:PATH[:uint16|uint32]
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
    mesh: str | None = None  # e.g. "fsdp=4" or "data=2,fsdp=2,expert=2" (torch_xla SPMD)
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def model_config_resolved(self, vocab_size: int) -> BiBoConfig:
        base = (BiBoConfig.from_file(self.model_config) if self.model_config
                else BiBoConfig.preset(self.preset))
        base = BiBoConfig.from_dict({**base.to_dict(), **self.model_overrides})
        if vocab_size > base.vocab_size:
            raise ValueError(f"the data has {vocab_size} token ids but the model's vocab_size "
                             f"is {base.vocab_size}")
        overrides: dict[str, Any] = {}
        if self.capacity_factor is not None:
            overrides["capacity_factor"] = self.capacity_factor
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s): {', '.join(sorted(unknown))}")
        return cls(**values)


class MetricsLog:
    """Appends one JSON object per line to ``OUT/metrics.jsonl`` and mirrors it to the bar."""

    def __init__(self, path: Path, bar: tqdm) -> None:
        self.path, self.bar = path, bar

    def write(self, record: dict[str, Any]) -> None:
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
          stop_after: int | None = None) -> Path:
    """Run (or resume) training into ``out``; returns the final checkpoint folder.

    ``stop_after`` ends this invocation after that many steps (the schedule still spans
    ``config.steps``), as an interruption would: ``resume=True`` then continues exactly.
    """
    out = Path(out)
    checkpoints = out / "checkpoints"
    latest = checkpoint_dirs(checkpoints)[-1] if resume and checkpoint_dirs(checkpoints) else None
    if resume and latest is None:
        raise ValueError(f"nothing to resume: {checkpoints} holds no checkpoint")
    if not resume and checkpoint_dirs(checkpoints):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose "
                         "another --out")
    if resume:  # the run's own config wins, except the length of the schedule
        saved = TrainConfig.from_json((out / "train_config.json").read_text())
        config = dataclasses.replace(saved, steps=config.steps)

    parallel = Parallelism.from_spec(config.mesh, config.device)  # before any device exists
    backend = select_backend(config.device, config.precision)
    data = make_data_source(config.data, config.batch_size, config.seed, config.sequence_length)
    print(f"training on {backend.name}{parallel.describe()} "
          f"({'bf16 autocast' if backend.bf16 else 'fp32'}), data {config.data}", flush=True)

    torch.manual_seed(config.seed)
    if latest is None:
        model, saved_state, start = BiBoForCausalLM(config.model_config_resolved(data.vocab_size)), None, 0
    else:
        model, saved_state, start = load_training_checkpoint(latest)
        print(f"resuming from {latest} (step {start})", flush=True)
    model.gradient_checkpointing = config.gradient_checkpointing
    model = backend.prepare_model(model.to(backend.device).train())
    parallel.shard_model(model)

    lr = torch.zeros((), device=backend.device)
    step_counter = torch.full((), float(start), device=backend.device)
    optimizer = build_optimizer(model, lr, config.weight_decay, capturable=backend.name != "cpu",
                                foreach=backend.name == "cuda")
    if saved_state is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        use_lr_tensor(optimizer, lr)  # the saved copy is a host tensor; the step writes this one
        torch.set_rng_state(saved_state["torch_rng"])
    warmup = max(1, int(config.warmup_fraction * config.steps))
    schedule = lambda step: warmup_cosine(step, config.lr, warmup, config.steps,  # noqa: E731
                                          config.min_lr_ratio)
    step_fn = backend.compile_step(TrainStep(model, optimizer, lr, step_counter, schedule,
                                             config.grad_clip, backend.autocast))

    out.mkdir(parents=True, exist_ok=True)
    if latest is None:
        atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2))
        (out / "metrics.jsonl").unlink(missing_ok=True)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    tokens_per_step = config.batch_size * config.grad_accum * data.sequence_length
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    log = MetricsLog(out / "metrics.jsonl", bar)
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
        backend.sync()
        if done % config.eval_every == 0 or done == config.steps:
            log.write({"step": done, "eval": evaluate(model, data, backend, parallel)})
        if done % config.checkpoint_every == 0 or done == end:
            save_training_checkpoint(checkpoints, done, model, optimizer, config.keep_checkpoints)
    bar.close()

    final = out / "final"
    if end == config.steps:
        model.save_pretrained(final)
        print(f"final checkpoint: {final}", flush=True)
    return final if end == config.steps else checkpoint_dirs(checkpoints)[-1]
