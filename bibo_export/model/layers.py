"""Building blocks shared by the attention and feed-forward parts of BiBo (docs/design.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows of a matrix in 16-byte multiples (8 bf16 elements): what torch._grouped_mm requires and
# what cuBLAS needs to choose Hopper's own matmul kernels.
MATMUL_ALIGNMENT = 8


class RMSNorm(nn.Module):
    """RMSNorm in fp32, cast back to the input dtype, then scaled by a weight (init 1)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        # x / sqrt(…) rather than x * rsqrt(…): the same value, written in the form ONNX
        # Runtime fuses into one SimplifiedLayerNormalization node (seven nodes otherwise).
        normed = x32 / torch.sqrt(self.mean_square(x32) + self.eps)
        return normed.to(x.dtype) * self.weight

    def mean_square(self, x32: Tensor) -> Tensor:
        """mean(x²) over the last dimension, keeping it: [..., 1]."""
        return x32.pow(2).mean(-1, keepdim=True)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [..., T, head_dim] for rotate-half RoPE at positions [..., T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class Rotary(nn.Module):
    """Rotate-half RoPE over the full head dim: x [B, heads, T, d] at its positions' cos/sin
    tables (``rotary_cos_sin``). No parameters: a module so that exporters can swap how the
    halves are rotated."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return (x.float() * cos + self.rotate_half(x).float() * sin).to(x.dtype)

    def rotate_half(self, x: Tensor) -> Tensor:
        """[-x₂, x₁] for x = [x₁, x₂] split in halves along the last dimension."""
        half = self.head_dim // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class CacheWrite(nn.Module):
    """A call's keys or values [B, G, T, d] written into their ``slots`` [T] of the static
    cache [B, G, max_len, d]. No parameters: a module so that exporters can swap the form."""

    def forward(self, cache: Tensor, slots: Tensor, new: Tensor) -> Tensor:
        return cache.index_copy(2, slots, new.to(cache.dtype))


def causal_window(x: Tensor, state: Tensor | None, history: int) -> tuple[Tensor, Tensor]:
    """The input of a causal convolution over time: x [B, T, C] behind its ``history`` previous
    inputs (zeros at a sequence's start). Returns ([B, history + T, C], the new state, the last
    ``history`` inputs), so running a sequence in pieces equals running it whole."""
    if state is None:
        state = x.new_zeros(x.shape[0], history, x.shape[2])
    padded = torch.cat([state.to(x.dtype), x], dim=1)
    return padded, padded[:, padded.shape[1] - history:]


def causal_conv1d(x: Tensor, weight: Tensor, state: Tensor | None,
                  as_matmul: bool = False) -> tuple[Tensor, Tensor]:
    """Causal, bias-free Conv1d over time: x [B, T, C_in], weight [C_out, C_in, K].

    Returns ([B, T, C_out], new state [B, K-1, C_in]); ``state`` holds the sequence's previous
    K-1 inputs (see ``causal_window``). ``as_matmul`` computes the same values as one matmul
    over the K shifted copies of the input (``conv1d_as_matmul``).
    """
    padded, state = causal_window(x, state, weight.shape[-1] - 1)
    if as_matmul:
        return conv1d_as_matmul(padded, weight), state
    return F.conv1d(padded.transpose(1, 2), weight.to(x.dtype)).transpose(1, 2), state


def conv1d_as_matmul(padded: Tensor, weight: Tensor) -> Tensor:
    """A valid Conv1d over time, padded [B, T+K-1, C_in] → [B, T, C_out], as one matmul: a
    convolution is a linear map of its window.

    Training uses it. On CUDA under bf16 autocast, cuDNN's conv1d with its layout transposes
    took about 1.6 ms of GPU time per ``reference`` train step, 4×1,024 tokens (H200,
    2026-11-27), for the FLOPs of a matmul of a few hundred µs. Evaluation keeps the Conv1d."""
    windows = causal_windows(padded, weight.shape[-1])
    return F.linear(windows, conv_weight_as_linear(weight).to(padded.dtype))


def causal_windows(padded: Tensor, kernel_size: int) -> Tensor:
    """The K-input window of every position, side by side: padded [B, T+K-1, C] → [B, T, K·C],
    feature j·C + c holding channel c at offset j (``conv_weight_as_linear``'s order)."""
    length = padded.shape[1] - kernel_size + 1
    return torch.cat([padded[:, j:j + length] for j in range(kernel_size)], dim=-1)


def conv_weight_as_linear(weight: Tensor) -> Tensor:
    """A Conv1d weight [C_out, C_in, K] as the Linear weight [C_out, K·C_in] over
    ``causal_windows``."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the dense FFN of mlp-only layers."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
