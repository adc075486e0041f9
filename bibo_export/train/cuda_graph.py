"""The whole CUDA train step replayed as one CUDA graph (``--compile-mode step-graph``).

torch.compile's ``reduce-overhead`` graphs only the compiled forward and backward: gradient
clipping, AdamW, the router-bias update, the learning-rate schedule and the metrics still launch
their kernels one by one from Python, and on a short step the GPU waits for them. The step is
tensor code with no host synchronisation (docs/design.md: written for XLA), and its AdamW keeps its
step counts on the device (``capturable``), so the whole of it can be captured once and then
replayed, which costs one launch per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], dict[str, Tensor]]


class GraphedStep:
    """``step(input_ids, labels)`` that replays a CUDA graph of ``step`` from its
    ``warmup_calls + 1``-th call on.

    The first calls run ``step`` as it is, on a side stream, as PyTorch's CUDA graph notes
    prescribe before a capture: they compile it and make the optimizer's and the allocator's
    buffers. The next call captures
    the step and replays it once. Every call is one real optimisation step: captured work does
    not run while it is captured. Inputs are copied into the buffers the graph reads, so every
    call must have the captured call's shapes; the metrics returned are copies, so a later
    replay does not overwrite them.
    """

    def __init__(self, step: StepFn, warmup_calls: int = 2) -> None:
        self.step, self.warmup_calls = step, warmup_calls
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, Tensor] = ()
        self.outputs: dict[str, Tensor] = {}

    def __call__(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls <= self.warmup_calls:
            return self._on_side_stream(input_ids, labels)
        if self.graph is None:
            self._capture(input_ids, labels)
        elif input_ids.shape != self.inputs[0].shape or labels.shape != self.inputs[1].shape:
            raise ValueError(f"a CUDA-graphed train step takes the shapes it was captured with, "
                             f"{tuple(self.inputs[0].shape)}, not {tuple(input_ids.shape)}")
        self.inputs[0].copy_(input_ids)
        self.inputs[1].copy_(labels)
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}

    def _on_side_stream(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            metrics = self.step(input_ids, labels)
        torch.cuda.current_stream().wait_stream(side)
        return metrics

    def _capture(self, input_ids: Tensor, labels: Tensor) -> None:
        self.inputs = (input_ids.clone(), labels.clone())
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*self.inputs)
        except RuntimeError as err:
            raise RuntimeError(f"--compile-mode step-graph: the train step could not be captured "
                               f"as one CUDA graph ({err}); use reduce-overhead") from err
