"""The export forms of the norm, of RoPE (ExecuTorch), of the cache write and of attention
(ONNX and ExecuTorch) compute what the model's modules compute (the model's own modules are the
oracle); the int8 Linear computes 8da8w as written out here by hand."""

from __future__ import annotations

import pytest
import torch

from bibo_export.config import BiBoConfig
from bibo_export.export.transforms import (CacheAttention, DynamicInt8Linear,
                                           InPlaceCacheWrite, MatmulMeanRMSNorm, MatmulRotary,
                                           ScatterCacheWrite, SdpaGroupedAttention)
from bibo_export.model.attention import AttentionInputs, GroupedAttention, TokenPositions
from bibo_export.model.layers import CacheWrite, RMSNorm, Rotary, rotary_cos_sin

pytestmark = pytest.mark.export


@pytest.mark.parametrize("dim", [64, 96, 256])
def test_matmul_mean_rmsnorm_equals_rmsnorm(dim):
    torch.manual_seed(0)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 3, dim) * 4
    export_form = MatmulMeanRMSNorm(norm)
    assert export_form.weight is norm.weight
    torch.testing.assert_close(export_form(x), norm(x), rtol=1e-6, atol=1e-6)


def test_matmul_rotary_equals_rotate_half_exactly():
    torch.manual_seed(0)
    head_dim = 64
    x = torch.randn(2, 4, 9, head_dim)
    cos, sin = rotary_cos_sin(torch.arange(3, 12), head_dim, 10_000.0)
    rotary = Rotary(head_dim)
    export_form = MatmulRotary(rotary)
    # Each output of the half rotation is one input times ±1: no rounding at all.
    assert torch.equal(export_form.rotate_half(x), rotary.rotate_half(x))
    assert torch.equal(export_form(x, cos, sin), rotary(x, cos, sin))


@pytest.mark.parametrize("slots", [[5], [0, 1, 2, 3], [2, 7, 3]])
def test_scatter_cache_write_equals_index_copy_exactly(slots):
    torch.manual_seed(0)
    cache = torch.randn(2, 3, 8, 16)
    before = cache.clone()
    new = torch.randn(2, 3, len(slots), 16, dtype=torch.float64)  # cast to the cache's dtype
    slots = torch.tensor(slots)
    want = CacheWrite()(cache, slots, new)
    got = ScatterCacheWrite()(cache, slots, new)
    assert got.dtype == cache.dtype and torch.equal(got, want)
    assert torch.equal(cache, before)  # a new tensor: the graph's cache input stays as it was


@pytest.mark.parametrize("pad, cache", [(None, True), ([0, 3], True), ([0, 3], False)])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_sdpa_attention_equals_grouped_attention(pad, kv_heads, cache):
    """4 queries at slots 5–8 over a static cache of 12 slots or over their own tokens; with
    ``pad``, the per-row mask of a left-padded batch."""
    torch.manual_seed(0)
    heads, head_dim, keys = 8, 16, 12 if cache else 4
    q = torch.randn(2, heads, 4, head_dim)
    k, v = torch.randn(2, 2, kv_heads, keys, head_dim).unbind(0)
    positions = TokenPositions(torch.arange(5, 9), None if pad is None else torch.tensor(pad))
    inputs = AttentionInputs.of(positions, BiBoConfig.preset("sort-tiny"),
                                torch.arange(keys) if cache else None, torch.float32)
    want = GroupedAttention()(q, k, v, inputs, 0.25)
    got = SdpaGroupedAttention()(q, k, v, inputs, 0.25)
    assert got.shape == (2, 4, heads * head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start, length", [(0, 5), (5, 1), (5, 4), (11, 1)])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_cache_kernels_reference_equals_grouped_attention_over_the_static_cache(start, length,
                                                                                kv_heads):
    """A call of ``length`` tokens from slot ``start`` (a prefill, decode steps, the cache's last
    slot) writes the same keys and values in place and attends as the model's masked form does
    over the whole static cache, whose later slots hold stale values: the reference semantics
    of ``bibo::update_cache`` and ``bibo::cache_attention`` that the C++ kernels are tested
    against (test_kernels.py)."""
    torch.manual_seed(0)
    heads, head_dim, slots = 8, 16, 12
    q = torch.randn(1, heads, length, head_dim)
    k_new, v_new = torch.randn(2, 1, kv_heads, length, head_dim).unbind(0)
    k_cache, v_cache = torch.randn(2, 1, kv_heads, slots, head_dim).unbind(0)
    positions = TokenPositions(torch.arange(start, start + length))
    inputs = AttentionInputs.of(positions, BiBoConfig.preset("sort-tiny"), torch.arange(slots),
                                torch.float32)
    k_want = CacheWrite()(k_cache, positions.slots, k_new)
    v_want = CacheWrite()(v_cache, positions.slots, v_new)
    want = GroupedAttention()(q, k_want, v_want, inputs, 0.25)
    k_got, v_got = (InPlaceCacheWrite()(cache, positions.slots, new)
                    for cache, new in zip((k_cache, v_cache), (k_new, v_new)))
    assert k_got is k_cache and v_got is v_cache  # written in place
    assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    got = CacheAttention()(q, k_got, v_got, inputs, 0.25)
    assert got.shape == (1, length, heads * head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def by_hand_8da8w(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """8da8w written out: each token's activations on 256 levels from min(x, 0) to max(x, 0)
    (asymmetric int8), each weight row on ±127 levels of max|row| / 127 (symmetric int8), both
    mapped back to float before one float product."""
    x64, w64 = x.double(), linear.weight.detach().double()
    low = x64.amin(-1, keepdim=True).clamp(max=0)
    high = x64.amax(-1, keepdim=True).clamp(min=0)
    step = (high - low) / 255
    zero = (-128 - torch.round(low / step)).clamp(-128, 127)
    x_levels = (torch.round(x64 / step) + zero).clamp(-128, 127)
    w_step = w64.abs().amax(-1, keepdim=True) / 127
    w_levels = torch.round(w64 / w_step).clamp(-127, 127)
    bias = None if linear.bias is None else linear.bias.detach().double()
    return torch.nn.functional.linear((x_levels - zero) * step, w_levels * w_step, bias)


@pytest.mark.parametrize("bias", [False, True])
def test_dynamic_int8_linear_is_8da8w(bias):
    """Each token gets its own activation scale: tokens 100× apart in size keep the same
    relative precision; and the result stays within int8 error of the float Linear."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias)
    x = torch.randn(2, 5, 96) * torch.tensor([0.01, 1.0, 3.0, 100.0, 0.5])[:, None]
    with torch.no_grad():
        got = DynamicInt8Linear(linear)(x)
        exact = linear(x)
    oracle = by_hand_8da8w(linear, x)
    # Per token, relative to its largest output: float32 sums of a 100× token round 100× larger.
    rounding = (got.double() - oracle).abs().amax(-1) / oracle.abs().amax(-1)
    assert rounding.max() < 1e-5, rounding
    relative = (got - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.02, relative
