"""One optimisation step of BiBo: forward, backward, optimizer step and the router-bias update.

Everything here is tensor code with no host synchronisation, so under torch_xla the whole step
traces into one graph that compiles once (DESIGN §5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import BiBoForCausalLM


def train_step(model: BiBoForCausalLM, optimizer: torch.optim.Optimizer, input_ids: Tensor,
               labels: Tensor) -> Tensor:
    """Run one step in place and return the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids, labels=labels)
    out.loss.backward()
    optimizer.step()
    model.apply_routing_stats(out.routing)
    return out.loss.detach()
