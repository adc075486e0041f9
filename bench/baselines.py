"""Reference-style dynamic dispatch, the baseline our static formulations are measured against.

Like the reference BiBo (and HF's eager MoE): per expert, a boolean mask of the tokens that chose
it, ``nonzero`` to find them, and a gather of exactly those tokens. No token is ever dropped,
but shapes depend on the routing, so XLA recompiles and torch.export cannot trace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bibo_export.model.moe import MoE


class LoopDispatchMoE(MoE):
    def _mlp_experts(self, flat: Tensor, indices: Tensor, weights: Tensor,
                     gates: Tensor) -> tuple[Tensor, Tensor]:
        experts = self.experts
        out = torch.zeros_like(flat)
        for e in range(self.config.num_mlp_experts):
            token, choice = torch.nonzero(indices == e, as_tuple=True)
            x = flat[token]
            y = F.silu(x @ experts.gate_proj[e].t()) * (x @ experts.up_proj[e].t())
            y = (y @ experts.down_proj[e].t()) * weights[token, choice, None].to(flat.dtype)
            out = out.index_add(0, token, y)
        return out, flat.new_zeros((), dtype=torch.float32)
