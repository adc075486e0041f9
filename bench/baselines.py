"""Reference-style dynamic dispatch, the baseline our static formulations are measured against.

Like the reference BiBo (and HF's eager MoE): per expert, a boolean mask of the tokens that chose
it, ``nonzero`` to find them, and a gather of exactly those tokens. No token is ever dropped,
but shapes depend on the routing, so XLA recompiles and torch.export cannot trace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bibo_export.model.moe import MLPExperts, Selection


class LoopExperts(MLPExperts):
    """The same stacked weights as ``MLPExperts``, computed expert by expert."""

    def forward(self, flat: Tensor, selection: Selection) -> tuple[Tensor, Tensor]:
        out = torch.zeros_like(flat)
        for e in range(self.gate_proj.shape[0]):
            token, choice = torch.nonzero(selection.indices == e, as_tuple=True)
            x = flat[token]
            y = F.silu(x @ self.gate_proj[e].t()) * (x @ self.up_proj[e].t())
            y = (y @ self.down_proj[e].t()) * selection.weights[token, choice, None].to(flat.dtype)
            out = out.index_add(0, token, y)
        return out, flat.new_zeros((), dtype=torch.float32)
