"""The export forms of the norm, of RoPE (ExecuTorch) and of the cache write (ONNX) compute what
the model's modules compute (the model's own modules are the oracle)."""

from __future__ import annotations

import pytest
import torch

from bibo_export.export.transforms import MatmulMeanRMSNorm, MatmulRotary, ScatterCacheWrite
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
