"""Grouped-query attention with q/k RMSNorm, RoPE, causal SSMax and a static KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BiBoConfig
from .layers import CacheWrite, RMSNorm, Rotary, rotary_cos_sin


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

    def attention_mask(self, key_slots: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive mask (0 where a query sees a key, -inf elsewhere): [T, K], or
        [B, 1, 1, T, K] with padding (broadcast over KV heads and the queries of a group).
        A query sees the keys up to its own slot, never a padding key; a padding query sees
        itself only, which keeps its (unused) output finite."""
        sees = key_slots[None, :] <= self.slots[:, None]
        if self.pad is not None:
            real_key = key_slots[None, None, :] >= self.pad[:, None, None]
            itself = key_slots[None, None, :] == self.slots[None, :, None]
            sees = (sees[None] & (real_key | itself))[:, None, None]
        return torch.where(sees, torch.zeros((), dtype=dtype, device=sees.device),
                           float("-inf"))


@dataclass
class AttentionInputs:
    """What every layer's attention reads about a call's positions. It depends on the
    positions only, so the model computes it once per call, not once per layer (an exported
    graph then holds one copy)."""

    positions: TokenPositions
    cos: Tensor  # rotary tables [T, d], or [B, 1, T, d] for per-row positions
    sin: Tensor
    log_n: Tensor  # SSMax ln(max(N, 2)) per query [T], or [B, T]
    mask: Tensor | None  # additive, see TokenPositions.attention_mask; None: plain causal

    @classmethod
    def of(cls, positions: TokenPositions, config: BiBoConfig, key_slots: Tensor | None,
           dtype: torch.dtype) -> AttentionInputs:
        """``key_slots``: the cache slots the keys sit in (None: this call's own tokens, from
        the start of their sequences, which is plain causal attention when unpadded)."""
        in_sequence = positions.in_sequence
        cos, sin = rotary_cos_sin(in_sequence, config.head_dim, config.rope_theta)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        log_n = torch.log(torch.clamp(in_sequence.float() + 1.0, min=2.0))
        if key_slots is None and positions.pad is not None:
            key_slots = positions.slots
        mask = None if key_slots is None else positions.attention_mask(key_slots, dtype)
        return cls(positions, cos, sin, log_n, mask)


def ssmax_query_scale(log_n: Tensor, head_scale: Tensor) -> Tensor:
    """s_h · ln(max(N, 2)) with N = t + 1 keys seen by the query at position t: [H, T, 1], or
    [B, H, T, 1] for per-row ``log_n`` [B, T] (``AttentionInputs.log_n``).

    Causal (docs/design.md): N depends only on the query's own position, never on the call length,
    so cached decoding sees the same scale as a full forward.
    """
    return (head_scale.float()[:, None] * log_n[..., None, :])[..., None]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale + mask) v with grouped-query heads, as [B, T, H·d]: q [B, H, T, d],
    k and v [B, G, K, d] (query head h reads KV head h // (H / G)), mask broadcast to
    [B, G, H / G, T, K].

    Each KV head's queries form one matrix, so the keys and values are read as they are: a
    repeat of the KV heads would copy the whole cache in every layer of every decode step.
    """
    B, H, _, d = q.shape
    G, K = k.shape[1], k.shape[2]
    # Rows: (query head within the group, token). contiguous() then view, not reshape: the
    # exported reshape of the transposed q gets a symbolic length XNNPACK cannot take.
    grouped = q.contiguous().view(B * G, -1, d)
    scores = torch.bmm(grouped, k.reshape(B * G, K, d).transpose(1, 2)) * scale
    scores = scores.view(B, G, H // G, -1, K) + mask
    probs = torch.softmax(scores, dim=-1).view(B * G, -1, K)
    out = torch.bmm(probs, v.reshape(B * G, K, d)).view(B, G, H // G, -1, d)
    return out.permute(0, 3, 1, 2, 4).reshape(B, -1, H * d)


class GroupedAttention(nn.Module):
    """``grouped_attention`` over a cache or a padded call, with ``inputs.mask``. No parameters:
    a module so that exporters can swap the form (which may read the positions instead)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs,
                scale: float) -> Tensor:
        return grouped_attention(q, k, v, inputs.mask, scale)


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
        self.rotary = Rotary(self.head_dim)
        self.cache_write = CacheWrite()
        self.attend = GroupedAttention()
        self.ssmax_scale = (nn.Parameter(torch.full((self.num_heads,), config.ssmax_init))
                            if config.use_ssmax else None)

    def forward(self, x: Tensor, inputs: AttentionInputs,
                cache: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, h] at ``inputs.positions``; returns output and the updated cache.

        Without a cache the keys are this call's tokens; with one, they are the whole static
        cache [B, G, max_len, d] and the mask hides slots after each query (and padding).
        """
        B = x.shape[0]
        # Per-head norms before the transpose to [B, heads, T, d]: the same values, and the
        # norm stays a pattern ONNX Runtime fuses (a transpose inside it blocks the fusion).
        # Shapes say -1 for the call length: a reshape to a symbolic length is one that
        # ExecuTorch's XNNPACK backend cannot take.
        q = self.q_norm(self.q_proj(x).view(B, -1, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, -1, self.num_kv_heads, self.head_dim))
        k = k.transpose(1, 2)
        v = self.v_proj(x).view(B, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotary(q, inputs.cos, inputs.sin)
        k = self.rotary(k, inputs.cos, inputs.sin)
        if self.ssmax_scale is not None:
            q = (q.float() * ssmax_query_scale(inputs.log_n, self.ssmax_scale)).to(q.dtype)

        new_cache: dict[str, Tensor] = {}
        if cache is not None:
            slots = inputs.positions.slots
            k = self.cache_write(cache["key"], slots, k)
            v = self.cache_write(cache["value"], slots, v)
            new_cache = {"key": k, "value": v}
        k, v = k.to(q.dtype), v.to(q.dtype)
        scale = 1.0 / math.sqrt(self.head_dim)
        if inputs.mask is None:
            # A whole sequence from its start (training): plain causal attention. Without an
            # explicit mask CUDA runs its flash kernel, which skips the masked half.
            group = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                 v.repeat_interleave(group, dim=1),
                                                 is_causal=True, scale=scale)
            out = out.transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim)
        else:
            out = self.attend(q, k, v, inputs, scale)
        return self.o_proj(out), new_cache
