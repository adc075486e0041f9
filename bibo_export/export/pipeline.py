"""One export pipeline for every backend, as named stages:

    prepare → transform → export → quantize → lower → save → verify → publish

*prepare* loads the checkpoint and fixes the settings (maximum length, batch size); a backend's
``Recipe`` supplies *transform* … *lower* (in the order its toolchain needs: torchao quantizes
modules before ``torch.export``, ONNX Runtime quantizes the exported graph) and *save*. The
pipeline then runs the saved artifact in its runtime against eager PyTorch (*verify*, judged by
``verdict``) and only then *publishes* it: the manifest is written and the folder replaces the
target. A failed verification raises ``ExportVerificationError`` and leaves whatever was there
before untouched. Each stage prints its name and duration, so a long export shows where it is.
"""

from __future__ import annotations

import contextlib
import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..artifacts import PRECISIONS, ArtifactMetadata, check_manifest, write_manifest
from ..io import atomic_directory
from ..model import BiBoForCausalLM
from ..runtimes import load
from ..runtimes.base import any_batch
from ..runtimes.eager import EagerRuntime
from ..verdict import compare_logits, compare_tokens, int8_accuracy_failures, judge

VERIFY_SEED = 0
Stage = tuple[str, Callable[[Any], Any]]


class ExportVerificationError(ValueError):
    """The saved artifact does not compute what eager computes; nothing was published."""


@contextlib.contextmanager
def stage(exporter: str, name: str) -> Iterator[None]:
    print(f"[{exporter}] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"[{exporter}] {name} done in {time.perf_counter() - start:.1f}s", flush=True)


@dataclass(frozen=True)
class ExportSettings:
    max_length: int  # prompt + generated tokens the exported cache holds
    batch_size: int | None  # None: any batch size


class Recipe(ABC):
    """What one backend contributes to the pipeline. ``shared_stages`` run once, whatever the
    precisions asked for; ``output_stages`` once per precision, on a ``fork`` of the result."""

    format: ClassVar[str]
    versions_of: ClassVar[tuple[str, ...]]

    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings

    @abstractmethod
    def shared_stages(self) -> list[Stage]: ...

    @abstractmethod
    def output_stages(self, metadata: ArtifactMetadata) -> list[Stage]: ...

    def fork(self, state: Any) -> Any:
        return copy.deepcopy(state)

    @abstractmethod
    def save(self, state: Any, folder: Path, metadata: ArtifactMetadata) -> list[str]:
        """Write the artifact into ``folder``; returns the file names written."""

    @abstractmethod
    def inspect(self, state: Any, folder: Path, precision: str) -> dict[str, Any]:
        """Facts for the manifest; ``integer_kernels`` (int8) feeds the verdict."""

    @abstractmethod
    def summary(self, manifest: dict[str, Any]) -> str:
        """One printed line about a published artifact."""


def check_settings(model: BiBoForCausalLM, max_length: int | None,
                   batch_size: int | None) -> ExportSettings:
    limit = model.config.max_position_embeddings
    if max_length is None:
        max_length = limit
    if isinstance(max_length, bool) or not isinstance(max_length, int) or \
            not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in [2, {limit}] (the model's "
                         f"max_position_embeddings), got {max_length!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return ExportSettings(max_length, batch_size)


def check_outputs(outs: Mapping[str, str | Path]) -> dict[str, Path]:
    if not outs or set(outs) - set(PRECISIONS):
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {sorted(outs)}")
    folders = {precision: Path(out) for precision, out in outs.items()}
    for out in folders.values():
        if out.suffix in (".pte", ".onnx") or (out.exists() and not out.is_dir()):
            raise ValueError(f"the output must be a folder (it receives the model file and its "
                             f"manifest), got {out}")
    if len(set(folders.values())) < len(folders):
        raise ValueError("each precision needs its own output folder")
    return folders


def run_export(recipe_type: type[Recipe], source: str | Path | BiBoForCausalLM,
               outs: Mapping[str, str | Path], max_length: int | None = None,
               batch_size: int | None = None,
               reference: BiBoForCausalLM | None = None) -> dict[str, dict[str, Any]]:
    """Export ``source`` (a checkpoint folder or a model) to one folder per precision, e.g.
    ``{"fp32": "artifacts/onnx/fp32", "int8": "artifacts/onnx/int8"}``; each is verified against
    ``reference`` (default: the source model itself). Returns the published manifests."""
    folders = check_outputs(outs)
    name = recipe_type.format
    with stage(name, "prepare"):
        model = source if isinstance(source, BiBoForCausalLM) else \
            BiBoForCausalLM.from_pretrained(source)
        recipe = recipe_type(check_settings(model, max_length, batch_size))
        eager = EagerRuntime(reference or model, recipe.settings.max_length)
    source_name = None if isinstance(source, BiBoForCausalLM) else str(source)
    state: Any = model
    for stage_name, run in recipe.shared_stages():
        with stage(name, stage_name):
            state = run(state)
    manifests = {}
    for i, (precision, out) in enumerate(folders.items()):
        variant = state if i == len(folders) - 1 else recipe.fork(state)
        metadata = ArtifactMetadata(model.config, recipe.settings.max_length, precision,
                                    recipe.settings.batch_size)
        for stage_name, run in recipe.output_stages(metadata):
            with stage(name, f"{stage_name} {precision}"):
                variant = run(variant)
        manifests[precision] = publish(recipe, variant, out, metadata, eager, source_name)
        print(recipe.summary(manifests[precision]), flush=True)
    return manifests


def publish(recipe: Recipe, state: Any, out: Path, metadata: ArtifactMetadata,
            eager: EagerRuntime, checkpoint: str | None) -> dict[str, Any]:
    """save → verify → manifest in a temporary folder that replaces ``out`` only if verified."""
    name, precision = recipe.format, metadata.precision
    with atomic_directory(out) as folder:
        with stage(name, f"save {precision}"):
            files = recipe.save(state, folder, metadata)
        with stage(name, f"verify {precision}"):
            facts = recipe.inspect(state, folder, precision)
            verification = verify(folder, eager, metadata)
            if "integer_kernels" in facts:
                verification["integer_kernels"] = facts["integer_kernels"]
            failures = judge(verification, name, precision, scope="export")
            verification["passed"] = not failures
        if failures:
            raise ExportVerificationError(
                f"{name} {precision} export failed verification against eager: "
                f"{'; '.join(failures)}; {out} was left as it was")
        with stage(name, f"publish {precision}"):
            write_manifest(folder, files, format=name, precision=precision,
                           max_length=metadata.max_length, batch_size=metadata.batch_size,
                           checkpoint=checkpoint, versions=versions(recipe.versions_of),
                           verification=verification, **facts)
    return check_manifest(out)


def verify(folder: Path, eager: EagerRuntime, metadata: ArtifactMetadata) -> dict[str, Any]:
    """The saved artifact, run by its runtime, against eager on seeded random prompts:
    logits at every position and greedy generation through the cache."""
    candidate = any_batch(load(folder, check=False))
    max_length, vocab = metadata.max_length, metadata.config.vocab_size
    rng = np.random.default_rng(VERIFY_SEED)
    length = max(1, min(16, max_length // 2))
    prompts = rng.integers(0, vocab, (2, length), dtype=np.int64)
    row: dict[str, Any] = compare_logits(candidate.logits(prompts), eager.logits(prompts))
    start = prompts[:, :max(1, length // 2)]
    new_tokens = min(16, max_length - start.shape[1])
    row.update(compare_tokens(candidate.generate(start, new_tokens),
                              eager.generate(start, new_tokens)))
    if metadata.precision == "int8":  # informative on random weights (see verdict)
        row["int8_bars_met_on_random_prompts"] = not int8_accuracy_failures(row)
    return {**row, "prompts": list(prompts.shape)}


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    return {package: version(package) for package in ("bibo-export", "torch", *packages)}
