"""The causal convolution's two forms: Conv1d (inference, export) and one matmul (training),
and the shared expert's two forms built on them."""

import pytest
import torch

from bibo_export.model.layers import causal_conv1d
from bibo_export.model.moe import SharedConvExpert


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_matmul_form_equals_conv1d_with_gradients(kernel_size, with_state):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    weight = torch.randn(10, 12, kernel_size, requires_grad=True)
    state = torch.randn(2, kernel_size - 1, 12) if with_state else None
    results = []
    for as_matmul in (False, True):
        out, new_state = causal_conv1d(x, weight, state, as_matmul=as_matmul)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    (x, weight))
        results.append((out, new_state, *grads))
    for conv, matmul in zip(*results, strict=True):
        torch.testing.assert_close(matmul, conv, rtol=0, atol=1e-5)
    assert results[0][0].shape == (2, 7, 10)


def test_matmul_form_under_bf16_autocast_runs_in_bf16():
    """Training's CUDA path: the matmul autocasts like the Conv1d it replaces."""
    x, weight = torch.randn(1, 5, 8), torch.randn(6, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = causal_conv1d(x, weight, None, as_matmul=True)
    reference, _ = causal_conv1d(x, weight, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.05)


# Widths a multiple of MATMUL_ALIGNMENT and not: training pads the second.
@pytest.mark.parametrize("width", [16, 21])
def test_shared_expert_training_form_equals_inference_form(width):
    """Training's form (the convolution as one matmul, the width zero-padded) against the
    inference form (Conv1d, the Linear modules): outputs, conv states and every gradient."""
    torch.manual_seed(0)
    expert = SharedConvExpert(12, width, 3)
    x = torch.randn(2, 7, 12)
    state = torch.randn(2, 2, 12)
    results = []
    for training in (False, True):
        expert.train(training)
        inputs = x.clone().requires_grad_(True)
        out, new_state = expert(inputs, state)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), (inputs, *expert.parameters()))
        results.append((out, new_state, *grads))
    for inference, training in zip(*results, strict=True):
        assert training.shape == inference.shape
        torch.testing.assert_close(training, inference, rtol=0, atol=1e-5)
