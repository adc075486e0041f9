"""Grouped-query attention with q/k RMSNorm, RoPE, causal SSMax and a static KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BiBoConfig
from .layers import RMSNorm, apply_rotary, rotary_cos_sin


def ssmax_query_scale(positions: Tensor, head_scale: Tensor) -> Tensor:
    """s_h · ln(max(N, 2)) with N = t + 1 keys seen by the query at position t: [H, T, 1].

    Causal (DESIGN §4): N depends only on the query's own position, never on the call length,
    so cached decoding sees the same scale as a full forward.
    """
    log_n = torch.log(torch.clamp(positions.float() + 1.0, min=2.0))
    return (head_scale.float()[:, None] * log_n[None, :])[..., None]


class Attention(nn.Module):
    def __init__(self, config: BiBoConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.ssmax_scale = (nn.Parameter(torch.full((self.num_heads,), config.ssmax_init))
                            if config.use_ssmax else None)

    def forward(self, x: Tensor, positions: Tensor,
                cache: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, h] at absolute ``positions`` [T]; returns output and the updated cache.

        Without a cache the keys are this call's tokens; with one, they are the whole static
        cache [B, G, max_len, d] and the mask hides positions after each query.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        if self.ssmax_scale is not None:
            q = (q.float() * ssmax_query_scale(positions, self.ssmax_scale)).to(q.dtype)

        new_cache: dict[str, Tensor] = {}
        key_positions = positions
        if cache is not None:
            k = cache["key"].index_copy(2, positions, k.to(cache["key"].dtype))
            v = cache["value"].index_copy(2, positions, v.to(cache["value"].dtype))
            new_cache = {"key": k, "value": v}
            key_positions = torch.arange(k.shape[2], device=x.device)
        mask = key_positions[None, :] <= positions[:, None]  # [T, keys]

        group = self.num_heads // self.num_kv_heads
        k = k.to(q.dtype).repeat_interleave(group, dim=1)
        v = v.to(q.dtype).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=1.0 / math.sqrt(self.head_dim))
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), new_cache
