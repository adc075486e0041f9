"""One export pipeline for every backend, as named stages:

    prepare → transform → export → quantize → lower → save → verify → publish

*prepare* loads the checkpoint, fixes the settings (maximum length, batch size) and computes
what eager PyTorch outputs on the verification prompts; a backend's ``Recipe`` supplies
*transform* … *lower* (in the order its toolchain needs: ExecuTorch's int8 quantizes modules
before ``torch.export``, ONNX Runtime quantizes the exported graph) and *save*. The pipeline
then runs the saved artifact in its runtime against those eager outputs (*verify*, judged by
``verdict``) and only then *publishes* it: the manifest is written (listing the checkpoint's
``tokenizer.json`` too, copied beside the model) and the folder replaces the target. A
failed verification raises ``ExportVerificationError`` and leaves whatever was there before
untouched. Each stage prints its name, duration and the process's memory, so a long export
shows where it is.

Memory: at the ``reference`` preset (752.6M parameters) every full copy of the weights is 3 GB.
The pipeline owns the model it exports (loaded from the checkpoint, or a copy of the caller's),
the recipe transforms it in place, and nothing keeps the eager model alive during the later
stages: verification compares against outputs computed once at *prepare*.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import resource
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..artifacts import (PRECISIONS, TOKENIZER_FILE, ArtifactMetadata, check_manifest,
                         tokenizer_beside, write_manifest)
from ..config import BiBoConfig
from ..io import atomic_directory, file_sha256
from ..model import BiBoForCausalLM
from ..runtimes import load
from ..runtimes.base import ProgramError, any_batch
from ..runtimes.eager import EagerRuntime
from ..tokenizer import TextTokenizer
from ..verdict import (ACCURACY_BARS, accuracy_failures, check_finite_reference,
                       compare_logits, compare_tokens, judge)

VERIFY_SEED = 0
Stage = tuple[str, Callable[[Any], Any]]


class ExportVerificationError(ValueError):
    """The saved artifact does not compute what eager computes; nothing was published."""


def resident_gb() -> tuple[float, float]:
    """This process's resident memory now and its peak so far, in GB (Linux)."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * resource.getpagesize()
    return now / 1e9, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc). A model's many mid-sized tensors
    (an expert's 5 MB matrices) come from the heap, and glibc keeps what they leave behind,
    so without this an export's resident memory never falls after a stage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def stage(exporter: str, name: str) -> Iterator[None]:
    print(f"[{exporter}] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    # torch.export and fx graphs hold reference cycles: without a collection, what a finished
    # stage dropped (a 3 GB module at 750M parameters) lives on into the next one.
    gc.collect()
    release_free_memory()
    now, peak = resident_gb()
    print(f"[{exporter}] {name} done in {time.perf_counter() - start:.1f}s "
          f"(memory {now:.1f} GB, peak {peak:.1f} GB)", flush=True)


@dataclass(frozen=True)
class Expected:
    """What eager computes on the seeded verification prompts: the logits at every position,
    and the greedy tokens generated through the cache from the prompts' first halves."""

    prompts: np.ndarray
    logits: np.ndarray
    starts: np.ndarray
    tokens: np.ndarray

    @classmethod
    def of(cls, model: BiBoForCausalLM, max_length: int) -> Expected:
        eager = EagerRuntime(model, max_length)
        rng = np.random.default_rng(VERIFY_SEED)
        length = max(1, min(16, max_length // 2))
        prompts = rng.integers(0, model.config.vocab_size, (2, length), dtype=np.int64)
        starts = prompts[:, :max(1, length // 2)]
        new_tokens = min(16, max_length - starts.shape[1])
        return cls(prompts, eager.logits(prompts), starts, eager.generate(starts, new_tokens))


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
        """Facts for the manifest; ``integer_kernels`` (int8, int4) feeds the verdict."""

    @abstractmethod
    def summary(self, manifest: dict[str, Any]) -> str:
        """One printed line about a published artifact."""


def check_max_length(config: BiBoConfig, max_length: int | None) -> int:
    """The cache length an export of a ``config`` model gets: ``max_length``, or the model's
    own limit when None; anything outside [2, limit] is one line."""
    limit = config.max_position_embeddings
    if max_length is None:
        return limit
    if isinstance(max_length, bool) or not isinstance(max_length, int) or \
            not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an integer in [2, {limit}] (the model's "
                         f"max_position_embeddings), got {max_length!r}")
    return max_length


def check_settings(model: BiBoForCausalLM, max_length: int | None,
                   batch_size: int | None) -> ExportSettings:
    max_length = check_max_length(model.config, max_length)
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
               batch_size: int | None = None, reference: BiBoForCausalLM | None = None,
               **options: Any) -> dict[str, dict[str, Any]]:
    """Export ``source`` (a checkpoint folder or a model, left untouched) to one folder per
    precision, e.g. ``{"fp32": "artifacts/onnx/fp32", "int8": "artifacts/onnx/int8"}``; each
    is verified against ``reference`` (default: the source model itself). ``options`` go to
    the recipe. Returns the published manifests."""
    folders = check_outputs(outs)
    name = recipe_type.format
    with stage(name, "prepare"):
        model = copy.deepcopy(source) if isinstance(source, BiBoForCausalLM) else \
            BiBoForCausalLM.from_pretrained(source)
        recipe = recipe_type(check_settings(model, max_length, batch_size), **options)
        expected = Expected.of(reference or model, recipe.settings.max_length)
        check_finite_reference(expected.logits, "the model" if isinstance(
            source, BiBoForCausalLM) else str(source))
    source_name = None if isinstance(source, BiBoForCausalLM) else str(source)
    tokenizer = None if source_name is None else tokenizer_beside(source_name)
    eos_id = None if tokenizer is None else TextTokenizer.from_file(tokenizer).eos_id
    config, state = model.config, model
    del model  # from here on the recipe's state holds the only reference
    for stage_name, run in recipe.shared_stages():
        with stage(name, stage_name):
            state = run(state)
    manifests = {}
    for i, (precision, out) in enumerate(folders.items()):
        last = i == len(folders) - 1
        variant, state = (state, None) if last else (recipe.fork(state), state)
        metadata = ArtifactMetadata(config, recipe.settings.max_length, precision,
                                    recipe.settings.batch_size, eos_id)
        for stage_name, run in recipe.output_stages(metadata):
            with stage(name, f"{stage_name} {precision}"):
                variant = run(variant)
        manifests[precision] = publish(recipe, variant, out, metadata, expected, source_name,
                                       tokenizer)
        del variant  # release this precision's program before the next one is built
        print(recipe.summary(manifests[precision]), flush=True)
    return manifests


def publish(recipe: Recipe, state: Any, out: Path, metadata: ArtifactMetadata,
            expected: Expected, checkpoint: str | None,
            tokenizer: Path | None = None) -> dict[str, Any]:
    """save → verify → manifest in a temporary folder that replaces ``out`` only if verified;
    the checkpoint's ``tokenizer`` travels with the artifact."""
    name, precision = recipe.format, metadata.precision
    with atomic_directory(out) as folder:
        with stage(name, f"save {precision}"):
            files = recipe.save(state, folder, metadata)
            extra: dict[str, Any] = {}
            if tokenizer is not None:
                shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
                files.append(TOKENIZER_FILE)
                extra["tokenizer_sha256"] = file_sha256(folder / TOKENIZER_FILE)
        with stage(name, f"verify {precision}"):
            facts = recipe.inspect(state, folder, precision)
            try:
                verification = verify(folder, expected, metadata)
            except ProgramError as err:
                raise ExportVerificationError(
                    f"{name} {precision} export does not run: {err.what.replace(str(folder), str(out))}"
                    f"; nothing was published ({out} was left as it was)") from None
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
                           verification=verification, **facts, **extra)
    return check_manifest(out)


def verify(folder: Path, expected: Expected, metadata: ArtifactMetadata) -> dict[str, Any]:
    """The saved artifact, run by its runtime, against eager's outputs on the same prompts:
    logits at every position and greedy generation through the cache."""
    candidate = any_batch(load(folder, check=False))
    row: dict[str, Any] = compare_logits(candidate.logits(expected.prompts), expected.logits)
    new_tokens = expected.tokens.shape[1] - expected.starts.shape[1]
    row.update(compare_tokens(candidate.generate(expected.starts, new_tokens), expected.tokens))
    if metadata.precision in ACCURACY_BARS:  # informative on random weights (see verdict)
        row[f"{metadata.precision}_bars_met_on_random_prompts"] = \
            not accuracy_failures(row, metadata.precision)
    return {**row, "prompts": list(expected.prompts.shape)}


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    return {package: version(package) for package in ("bibo-export", "torch", *packages)}
