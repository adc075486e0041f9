"""The signatures exported programs have: the model's cache as flat tensors in and out (ONNX),
or as mutable buffers of the program (ExecuTorch).

Cache tensors have stable flat names ``layers.{i}.{key|value|shared_conv|router_conv}``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..model import BiBoForCausalLM
from ..model.bibo import LayerCache


def cache_names(model: BiBoForCausalLM) -> list[str]:
    layout = model.new_cache(1, 1)
    return [f"layers.{i}.{name}" for i, entry in enumerate(layout) for name in sorted(entry)]


def flatten_cache(cache: list[LayerCache]) -> tuple[Tensor, ...]:
    return tuple(entry[name] for entry in cache for name in sorted(entry))


def unflatten_cache(model: BiBoForCausalLM, tensors: tuple[Tensor, ...]) -> list[LayerCache]:
    layout = model.new_cache(1, 1)
    it = iter(tensors)
    return [{name: next(it) for name in sorted(entry)} for entry in layout]


class FlatCacheDecoder(nn.Module):
    """(input_ids [B, T], start_pos [] int64, pad [B] int64, *cache) → (logits [B, T, V],
    *new cache).

    One graph serves prefill (T = prompt length, start_pos 0) and decode (T = 1); ``pad`` counts
    each row's left padding in a batch of prompts of different lengths (zeros otherwise).
    """

    def __init__(self, model: BiBoForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, start_pos: Tensor, pad: Tensor,
                *cache: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids, cache=unflatten_cache(self.model, cache), start_pos=start_pos,
                         pad=pad)
        return (out.logits, *flatten_cache(out.cache))


class StatefulDecoder(nn.Module):
    """(input_ids [B, T], input_pos [1] int64) → logits; the cache lives in mutable buffers.

    ``input_pos`` holds the position of the first of the T tokens, as ExecuTorch's LLM runner
    passes it. Calling at position 0 begins a new sequence: cached positions ≥ it are masked by
    causality and overwritten as the sequence grows, and the conv states are zeroed.
    ``torch.export`` (torch 2.13) keeps the ``copy_`` calls in its non-functional IR, so
    ``graph_signature.buffers_to_mutate`` is empty until ``run_decompositions()`` (which
    ``to_edge`` runs) functionalizes them into buffer mutations of the program.
    """

    def __init__(self, model: BiBoForCausalLM, batch_size: int, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.batch_size, self.max_length = batch_size, max_length
        self.names = [name.replace(".", "_") for name in cache_names(model)]
        for name, tensor in zip(self.names, flatten_cache(model.new_cache(batch_size, max_length))):
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, input_ids: Tensor, input_pos: Tensor) -> Tensor:
        start_pos = input_pos[0]
        fresh = start_pos > 0  # conv states restart with each sequence
        cache = []
        for name in self.names:
            tensor = getattr(self, name)
            cache.append(tensor * fresh.to(tensor.dtype) if name.endswith("conv") else tensor)
        out = self.model(input_ids, cache=unflatten_cache(self.model, tuple(cache)),
                         start_pos=start_pos)
        for name, tensor in zip(self.names, flatten_cache(out.cache)):
            buffer = getattr(self, name)
            if tensor is not buffer:  # else written in place (``InPlaceCacheWrite``)
                buffer.copy_(tensor)
        return out.logits
