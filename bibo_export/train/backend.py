"""Where training runs: torch_xla (a TPU, or the XLA CPU backend), CUDA, or eager CPU.

The XLA backends compile the whole train step (``torch_xla.compile(full_graph=True)``) and read
metrics through step closures, so logging never forces an extra execution. CUDA compiles the
model with ``torch.compile``; eager CPU runs as is.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cuda_graph import GraphedStep
from .step import TrainStep

DEVICES = ("auto", "xla", "cpu", "cuda")
# How CUDA training compiles: torch.compile's modes ("default" is torch's own; reduce-overhead
# replays the compiled forward and backward as CUDA graphs), and step-graph, torch's default
# compile with the whole step (clipping and AdamW included) replayed as one CUDA graph.
STEP_GRAPH = "step-graph"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", STEP_GRAPH)


@dataclass
class Backend:
    name: str  # xla-tpu, xla-cpu, cpu, cuda
    device: torch.device
    bf16: bool
    # One of COMPILE_MODES (CUDA only); ``make bench-train`` compares them.
    compile_mode: str = "default"

    @property
    def is_xla(self) -> bool:
        return self.name.startswith("xla")

    @property
    def step_graph(self) -> bool:
        """Replay the whole CUDA train step as one graph (GraphedStep)."""
        return self.compile_mode == STEP_GRAPH

    @property
    def torch_compile_mode(self) -> str | None:
        """The mode torch.compile gets (None: its own default, which step-graph also uses)."""
        return None if self.compile_mode in ("default", STEP_GRAPH) else self.compile_mode

    def compile_step(self, step: TrainStep) -> Callable:
        if self.is_xla:
            import torch_xla
            return torch_xla.compile(step, full_graph=True)
        if self.name == "cuda":
            # The micro-batch's loss rather than the model alone: a graph that returns the fp32
            # logits must write them out (2 GB at `reference` size and 4×1,024 tokens); one that
            # returns the loss fuses their cast into the cross-entropy. It traces through the
            # model compiled by prepare_model, whose own graph serves evaluation.
            step.micro_batch = torch.compile(step.micro_batch, mode=self.torch_compile_mode)
            if self.step_graph:
                return GraphedStep(step)
        return step

    def check_dispatch(self, dispatch: str) -> None:
        """Refuse an MoE dispatch this backend cannot run, before any model is built."""
        if dispatch != "grouped":
            return
        # torch._grouped_mm: torch_xla 2.9 crashes on it (a segfault, not an error), and its
        # traced form, which CUDA training compiles, takes bf16 only (torch 2.13's meta check).
        # Eager CPU runs it in either precision.
        if self.is_xla or (self.name == "cuda" and not self.bf16):
            precision = "bf16" if self.bf16 else "fp32"
            raise ValueError(f"--moe-dispatch grouped runs on CUDA in bf16 and on the eager CPU, "
                             f"not on {self.name} in {precision}: use --moe-dispatch index")

    def use_compile_mode(self, mode: str) -> None:
        """How this backend compiles the model and the train step (CUDA only): a torch.compile
        mode, or STEP_GRAPH."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of "
                             f"{', '.join(COMPILE_MODES)}")
        if mode != "default" and self.name != "cuda":
            raise ValueError(f"--compile-mode {mode} applies to --device cuda (torch.compile), "
                             f"not {self.name}")
        self.compile_mode = mode

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.name == "cuda":
            # In place: parameters, buffers and the state dict keep their names.
            model.compile(mode=self.torch_compile_mode)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def on_host(self, callback: Callable[[Any], None], tensors: Any) -> None:
        """Call ``callback`` with ``tensors`` moved to the host once their values exist."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm
            # .cpu() transfers the computed values; .item() on a device tensor would re-execute.
            xm.add_step_closure(lambda t: callback(_to_cpu(t)), args=(tensors,))
        else:
            callback(_to_cpu(tensors))

    def compile_stats(self) -> dict[str, Any]:
        """XLA graphs compiled so far and ops that fell back to the CPU (``aten::*`` counters):
        after warm-up the first must stay flat and the second empty (docs/design.md)."""
        if not self.is_xla:
            return {}
        import torch_xla.debug.metrics as met
        compiles = met.metric_data("CompileTime")
        return {"xla_compiles": compiles[0] if compiles else 0,
                "cpu_fallbacks": sorted(n for n in met.counter_names() if n.startswith("aten::"))}

    def sync(self) -> None:
        if self.is_xla:
            import torch_xla
            torch_xla.sync()


def _to_cpu(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().cpu(), tree)


def default_pjrt_device() -> str:
    """TPU when this host has TPU chips and libtpu, else XLA's CPU backend."""
    tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and \
        importlib.util.find_spec("libtpu") is not None
    return "TPU" if tpu else "CPU"


def auto_device(spmd: bool = False) -> str:
    """What ``--device auto`` trains on: the best device present. A TPU through XLA, else a
    CUDA GPU, else XLA's CPU backend (the graphs a TPU would run), else eager on the CPU. An
    explicit ``PJRT_DEVICE`` or a mesh (``spmd``) asks for XLA whatever else is present."""
    has_xla = importlib.util.find_spec("torch_xla") is not None
    if has_xla and (spmd or "PJRT_DEVICE" in os.environ or default_pjrt_device() == "TPU"):
        return "xla"
    if torch.cuda.is_available():
        return "cuda"
    return "xla" if has_xla else "cpu"


# What the devices other than XLA mean to a user (XLA's line also names its backend).
DEVICE_DESCRIPTIONS = {"cuda": "a CUDA GPU, compiled by torch.compile",
                       "cpu": "eager PyTorch on the CPU (torch_xla is not installed here)"}


def describe_auto_device() -> str:
    """One line for a user: the device ``--device auto`` picks here, and why."""
    device = auto_device()
    if device != "xla":
        return f"{device}: {DEVICE_DESCRIPTIONS[device]}"
    pjrt = os.environ.get("PJRT_DEVICE") or default_pjrt_device()
    why = "PJRT_DEVICE is set" if "PJRT_DEVICE" in os.environ else \
        "a TPU is present" if pjrt == "TPU" else "no TPU and no CUDA GPU found"
    return f"xla-{pjrt.lower()}: torch_xla's {pjrt} backend ({why})"


def select_backend(device: str, precision: str = "auto", spmd: bool = False) -> Backend:
    """Resolve ``--device`` (``auto``: see ``auto_device``)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    has_xla = importlib.util.find_spec("torch_xla") is not None
    if device == "auto":
        device = auto_device(spmd)
    if device == "xla":
        if not has_xla:
            raise ValueError("--device xla needs torch_xla: run in .venv-xla (make setup-xla)")
        os.environ.setdefault("PJRT_DEVICE", default_pjrt_device())
        import torch_xla
        import torch_xla.runtime as xr
        name = f"xla-{xr.device_type().lower()}"
        backend = Backend(name, torch_xla.device(), bf16=_bf16(precision, name == "xla-tpu"))
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        backend = Backend("cuda", torch.device("cuda"), bf16=_bf16(precision, True))
    else:
        backend = Backend("cpu", torch.device("cpu"), bf16=_bf16(precision, False))
    return backend


def _bf16(precision: str, default: bool) -> bool:
    return default if precision == "auto" else precision == "bf16"
