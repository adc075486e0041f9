"""Greedy decoding through the static cache: one prefill, then one token per call."""

from __future__ import annotations

import torch
from torch import Tensor

from .bibo import BiBoForCausalLM


@torch.no_grad()
def greedy_generate(model: BiBoForCausalLM, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` [B, T]; returns [B, T + new]."""
    prompt_len = input_ids.shape[1]
    cache = model.new_cache(input_ids.shape[0], prompt_len + max_new_tokens)
    out = model(input_ids, cache=cache, start_pos=0)
    tokens = [input_ids]
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_token)
        if step + 1 < max_new_tokens:
            out = model(next_token, cache=out.cache, start_pos=prompt_len + step)
    return torch.cat(tokens, dim=1)
