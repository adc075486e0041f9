"""AdamW with the usual parameter groups and a warm-up + cosine schedule computed in-graph."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model import BiBoForCausalLM

NO_DECAY_SUFFIXES = ("norm.weight", "ssmax_scale", "bias")


def parameter_groups(model: BiBoForCausalLM, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and SSMax scales are excluded. The router's selection
    bias is a buffer, never an optimizer parameter."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: Tensor, weight_decay: float,
                    device_type: str) -> torch.optim.AdamW:
    """AdamW reading its learning rate from the device tensor ``lr``, with the update kernel
    that suits ``device_type`` (``cpu``, ``cuda`` or ``xla``).

    Off the host (XLA, CUDA) the step count and bias corrections stay on the device
    (``capturable``) so the update needs no host value; eager CPU cannot capture. CUDA and CPU
    run the fused kernel: one pass over parameters, gradients and moments, where the
    multi-tensor (foreach) form took a quarter of a ``reference`` train step's GPU time and the
    per-parameter form is 5× slower on CPU. XLA traces the plain per-parameter form into its
    graph: the fused kernel is CPU and CUDA only, and torch 2.9's foreach kernels reject
    capturable XLA tensors.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=0.0,
                                  betas=(0.9, 0.95), capturable=device_type != "cpu",
                                  foreach=False, fused=device_type in ("cpu", "cuda"))
    # Handed over after construction: AdamW's range check on a device tensor would read it back
    # to the host (an aten::_local_scalar_dense on XLA).
    use_lr_tensor(optimizer, lr)
    return optimizer


def initialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (moments and step counts) unless it has one, by one update
    that changes nothing, then put the step counts back to 0. The first training step then
    reads the state as every later step does; otherwise it creates it, and XLA compiles the
    whole step twice (once with the state appearing, once reading it), where this costs one
    small graph of the update alone.

    The update changes nothing because its gradients are zero (so are the moments it makes,
    and Adam's step, m / (sqrt(v) + eps), is exactly 0) and weight decay is off for it. Its
    learning rate is 1, not 0: the capturable form divides by the learning rate."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(optimizer.state.get(p) for p in params):
        return  # a resumed run: its state was loaded
    saved = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
    for group, (lr, _) in zip(optimizer.param_groups, saved):
        group["lr"] = torch.ones_like(lr) if isinstance(lr, Tensor) else 1.0
        group["weight_decay"] = 0.0
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param in params:
        param.grad = None
        optimizer.state[param]["step"].zero_()
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, weight_decay


def use_lr_tensor(optimizer: torch.optim.Optimizer, lr: Tensor) -> None:
    """Make every parameter group read the learning rate from ``lr`` (also after a reload)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step: Tensor, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> Tensor:
    """Linear warm-up from base/warmup to base, then cosine to base·min_ratio; tensor in, out.

    Only tensor arithmetic on the step counter: no per-step Python float enters the graph.
    """
    step = step.float()
    warm = (step + 1) / warmup_steps
    progress = torch.clamp((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
    cosine = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + torch.cos(math.pi * progress))
    return base_lr * torch.where(step < warmup_steps, warm, cosine)
