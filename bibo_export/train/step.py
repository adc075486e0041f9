"""One optimisation step of BiBo: forward, backward, clipping, optimizer step, router-bias update,
and with ``aux_loss_coef > 0`` the auxiliary load-balancing loss over the step's global batch.

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
from ..model.moe import balance_loss


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
        coef = model.config.aux_loss_coef
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=input_ids.device)
        counts, dropped = None, torch.zeros((), device=input_ids.device)
        probs_sum, tokens = None, 0
        for i in range(micro_batches):
            with self.autocast():
                out = model(input_ids[i], labels=labels[i])
            layer_counts = torch.stack([s.expert_counts for s in out.routing])
            counts = layer_counts if counts is None else counts + layer_counts
            loss = out.loss
            if coef > 0:
                # f over the micro-batches of this step so far (the whole step at the last one),
                # P of this micro-batch: its gradient is this micro-batch's to contribute.
                layer_probs = torch.stack([s.probs_sum for s in out.routing])
                loss = loss + balance_loss(counts, layer_probs / out.routing[0].num_tokens, coef)
                probs_sum = layer_probs.detach() + (0 if probs_sum is None else probs_sum)
                tokens += out.routing[0].num_tokens
            (loss / micro_batches).backward()
            # After backward: a recomputing (checkpointed) backward must see the bias it routed with.
            model.apply_routing_stats(out.routing)
            loss_sum = loss_sum + out.loss.detach().float()
            dropped = dropped + sum(s.dropped for s in out.routing)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.lr.copy_(self.schedule(self.step_counter))
        self.optimizer.step()
        self.step_counter.add_(1)
        assignments = counts.sum()
        metrics = {"loss": loss_sum / micro_batches, "grad_norm": grad_norm.detach(),
                   "lr": self.lr.detach().clone(), "drop_rate": dropped / assignments,
                   "load_cv": counts.std(-1, unbiased=False) / counts.mean(-1)}
        if coef > 0:  # the loss of the whole step: global f and P
            metrics["aux_loss"] = balance_loss(counts, probs_sum / tokens, coef).detach()
        return metrics
