"""Grouped-query attention with q/k RMSNorm, RoPE, causal SSMax and a static KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BiBoConfig
from .layers import RMSNorm, apply_rotary, rotary_cos_sin


@dataclass
class TokenPositions:
    """Where a call's tokens sit. ``slots`` [T]: their indices in the cache, shared by the rows;
    ``pad`` [B] (or None): left-padding tokens per row, when a batch holds prompts of different
    lengths. A token's position in its own sequence is its slot minus its row's padding, so a
    padded row computes what the same prompt computes alone."""

    slots: Tensor
    pad: Tensor | None = None

    @property
    def in_sequence(self) -> Tensor:
        """[T], or [B, T] with padding (padding tokens get 0: their outputs are never used)."""
        if self.pad is None:
            return self.slots
        return (self.slots[None, :] - self.pad[:, None]).clamp(min=0)

    def is_token(self) -> Tensor | None:
        """[B, T], False at padding; None without padding."""
        return None if self.pad is None else self.slots[None, :] >= self.pad[:, None]

    def attention_mask(self, key_slots: Tensor) -> Tensor:
        """Which keys each query sees: [T, K], or [B, 1, T, K] with padding. A query sees the
        keys up to its own slot, never a padding key; a padding query sees itself only, which
        keeps its (unused) output finite."""
        causal = key_slots[None, :] <= self.slots[:, None]
        if self.pad is None:
            return causal
        real_key = key_slots[None, None, :] >= self.pad[:, None, None]
        itself = key_slots[None, None, :] == self.slots[None, :, None]
        return (causal[None] & (real_key | itself))[:, None]


def ssmax_query_scale(positions: Tensor, head_scale: Tensor) -> Tensor:
    """s_h · ln(max(N, 2)) with N = t + 1 keys seen by the query at position t: [H, T, 1], or
    [B, H, T, 1] for per-row positions [B, T].

    Causal (DESIGN §4): N depends only on the query's own position, never on the call length,
    so cached decoding sees the same scale as a full forward.
    """
    log_n = torch.log(torch.clamp(positions.float() + 1.0, min=2.0))
    return (head_scale.float()[:, None] * log_n[..., None, :])[..., None]


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

    def forward(self, x: Tensor, positions: TokenPositions,
                cache: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, h] at ``positions``; returns output and the updated cache.

        Without a cache the keys are this call's tokens; with one, they are the whole static
        cache [B, G, max_len, d] and the mask hides slots after each query (and padding).
        """
        B, T, _ = x.shape
        # Per-head norms before the transpose to [B, heads, T, d]: the same values, and the
        # norm stays a pattern ONNX Runtime fuses (a transpose inside it blocks the fusion).
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        in_sequence = positions.in_sequence
        cos, sin = rotary_cos_sin(in_sequence, self.head_dim, self.rope_theta)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.ssmax_scale is not None:
            q = (q.float() * ssmax_query_scale(in_sequence, self.ssmax_scale)).to(q.dtype)

        new_cache: dict[str, Tensor] = {}
        key_slots = positions.slots
        if cache is not None:
            k = cache["key"].index_copy(2, positions.slots, k.to(cache["key"].dtype))
            v = cache["value"].index_copy(2, positions.slots, v.to(cache["value"].dtype))
            new_cache = {"key": k, "value": v}
            key_slots = torch.arange(k.shape[2], device=x.device)
        group = self.num_heads // self.num_kv_heads
        k = k.to(q.dtype).repeat_interleave(group, dim=1)
        v = v.to(q.dtype).repeat_interleave(group, dim=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        if cache is None and positions.pad is None:
            # A whole sequence from its start (training): plain causal attention. Without an
            # explicit mask CUDA runs its flash kernel, which skips the masked half.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                 attn_mask=positions.attention_mask(key_slots))
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), new_cache
