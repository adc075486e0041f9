"""Eager PyTorch on a checkpoint folder: the reference every other runtime is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import BiBoForCausalLM
from .base import Runtime


class EagerRuntime(Runtime):
    name = "eager"

    def __init__(self, model: BiBoForCausalLM, max_length: int | None = None) -> None:
        self.model = model.inference_copy()  # eval mode, no capacity drops: what exports compute
        super().__init__(model.config, max_length or model.config.max_position_embeddings)
        self._cache, self._pad = None, None

    @classmethod
    def from_path(cls, path: str | Path) -> EagerRuntime:
        return cls(BiBoForCausalLM.from_pretrained(path))

    @torch.no_grad()
    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        ids = torch.from_numpy(input_ids)
        self._pad = None if pad is None else torch.from_numpy(pad)
        cache = self.model.new_cache(ids.shape[0], self.max_length)
        out = self.model(ids, cache=cache, start_pos=0, pad=self._pad)
        self._cache = out.cache
        return out.logits.numpy()

    @torch.no_grad()
    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        out = self.model(torch.from_numpy(input_ids), cache=self._cache, start_pos=position,
                         pad=self._pad)
        self._cache = out.cache
        return out.logits.numpy()
