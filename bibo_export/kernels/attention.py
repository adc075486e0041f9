"""``bibo::update_cache`` and ``bibo::cache_attention``: attention over the static KV cache of
an ExecuTorch program, as two operators whose C++ kernels (``csrc/attention.cpp``) are in BiBo's
kernel library, so that a program needs ExecuTorch's released runtime and that library only.

The cache keeps the model's own layout, [B, G, max_len, d] (G key/value heads). A call of T
tokens at slots ``start`` … ``start + T - 1`` (a prefill from 0, or a decode step):

    update_cache(new [B, G, T, d], cache, start):  cache[:, :, start + t] = new[:, :, t], in place
    cache_attention(q [B, H, T, d], k_cache, v_cache, start, scale) → out [B, T, H·d]
        out[b, t, h] = Σ_{s ≤ start + t} softmax_s(scale · q[b, h, t] · k[b, g, s]) · v[b, g, s]
        with g = h // (H / G)

Each query reads the cache slots up to its own and no further: a decode step at position p
reads p + 1 slots, where a masked attention over the static cache reads all of them. The
implementations registered here are the reference semantics (tests compare the kernels with
them); ``torch.export`` records each operator as one node and ``to_executorch`` selects the
``.out`` variants, writing the cache in place as the schema's ``Tensor(a!)`` says.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moe_experts import fake_out, out_variant

_library = torch.library.Library("bibo", "FRAGMENT")
_library.define("update_cache(Tensor value, Tensor(a!) cache, SymInt start) -> Tensor")
_library.define("update_cache.out(Tensor value, Tensor(a!) cache, SymInt start, *, "
                "Tensor(b!) out) -> Tensor(b!)")
_library.define("cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start, "
                "float scale) -> Tensor")
_library.define("cache_attention.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start, "
                "float scale, *, Tensor(a!) out) -> Tensor(a!)")


def update_cache(value: Tensor, cache: Tensor, start: int) -> Tensor:
    """Writes ``value``'s T slots into ``cache`` from ``start``. Returns a one-element tensor:
    an operator that writes its input in place still needs an output of its own, and one the
    size of the cache would be a second cache."""
    cache[:, :, start:start + value.shape[2]] = value.to(cache.dtype)
    return value.new_zeros(1)


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
                    scale: float) -> Tensor:
    """Causal attention of the call's queries over the cache slots up to each one's."""
    B, H, T, d = q.shape
    group = H // k_cache.shape[1]
    visible = start + T  # the slots any query of this call reads
    k = k_cache[:, :, :visible].repeat_interleave(group, dim=1)
    v = v_cache[:, :, :visible].repeat_interleave(group, dim=1)
    causal = torch.arange(visible)[None, :] <= (start + torch.arange(T))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                                           attn_mask=causal, scale=scale)
    return out.transpose(1, 2).reshape(B, T, H * d)


def _update_cache_fake(value: Tensor, cache: Tensor, start: int) -> Tensor:
    return value.new_empty(1)


def _cache_attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
                          scale: float) -> Tensor:
    B, H, T, d = q.shape
    return q.new_empty(B, T, H * d)


for _name, _impl, _fake in (("update_cache", update_cache, _update_cache_fake),
                            ("cache_attention", cache_attention, _cache_attention_fake)):
    _library.impl(_name, _impl, "CompositeExplicitAutograd")
    _library.impl(f"{_name}.out", out_variant(_impl), "CompositeExplicitAutograd")
    _library.impl(_name, _fake, "Meta")
    _library.impl(f"{_name}.out", fake_out, "Meta")
