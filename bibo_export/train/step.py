"""One optimisation step of BiBo: forward, backward, clipping, optimizer step, router-bias update.

Everything is tensor code with no host synchronisation, so under ``torch_xla.compile`` the whole
step is one graph that compiles once per input shape (DESIGN §5). The learning rate is computed
in-graph from a step counter held on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from ..model import BiBoForCausalLM


class TrainStep:
    """``step(input_ids, labels)`` with [accum, B, T] inputs → dict of 0-d/1-d metric tensors."""

    def __init__(self, model: BiBoForCausalLM, optimizer: torch.optim.Optimizer, lr: Tensor,
                 step_counter: Tensor, schedule: Callable[[Tensor], Tensor], grad_clip: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> None:
        self.model, self.optimizer = model, optimizer
        self.lr, self.step_counter, self.schedule = lr, step_counter, schedule
        self.grad_clip, self.autocast = grad_clip, autocast

    def __call__(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        model, micro_batches = self.model, input_ids.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=input_ids.device)
        counts, dropped = None, torch.zeros((), device=input_ids.device)
        for i in range(micro_batches):
            with self.autocast():
                out = model(input_ids[i], labels=labels[i])
            (out.loss / micro_batches).backward()
            # After backward: a recomputing (checkpointed) backward must see the bias it routed with.
            model.apply_routing_stats(out.routing)
            loss_sum = loss_sum + out.loss.detach().float()
            layer_counts = torch.stack([s.expert_counts for s in out.routing])
            counts = layer_counts if counts is None else counts + layer_counts
            dropped = dropped + sum(s.dropped for s in out.routing)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.lr.copy_(self.schedule(self.step_counter))
        self.optimizer.step()
        self.step_counter.add_(1)
        assignments = counts.sum()
        return {"loss": loss_sum / micro_batches, "grad_norm": grad_norm.detach(),
                "lr": self.lr.detach().clone(), "drop_rate": dropped / assignments,
                "load_cv": counts.std(-1, unbiased=False) / counts.mean(-1)}
