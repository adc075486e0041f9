"""ONNX Runtime on an exported folder (``bibo-export export onnx``).

The graph is ``(input_ids, start_pos, *cache) → (logits, *new cache)``; the runtime keeps the
cache between calls as ORT values, so decoding never copies it through numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..artifacts import ONNX_FILE, ArtifactMetadata, check_manifest
from .base import Runtime

METADATA_KEY = "bibo.metadata"  # ArtifactMetadata as JSON, in the model's metadata properties


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, session: ort.InferenceSession, metadata: ArtifactMetadata) -> None:
        super().__init__(metadata.config, metadata.max_length)
        self.session, self.precision = session, metadata.precision
        self.cache_inputs = session.get_inputs()[3:]  # after input_ids, start_pos, pad
        self.output_names = [o.name for o in session.get_outputs()]
        self._cache: list[ort.OrtValue] = []

    @classmethod
    def from_path(cls, path: str | Path, check: bool = True,
                    options: ort.SessionOptions | None = None) -> OnnxRuntime:
        """Load ``path/model.onnx``; ``check`` first confirms every file against the manifest,
        so a truncated graph or missing external data is reported as such."""
        path = Path(path)
        if check:
            check_manifest(path)
        try:
            session = ort.InferenceSession(str(path / ONNX_FILE), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for unreadable models
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load {path / ONNX_FILE}: {reason}") from None
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path / ONNX_FILE} is not a bibo-export model (no {METADATA_KEY}): "
                             "export it again")
        return cls(session, ArtifactMetadata.from_json(meta[METADATA_KEY], path / ONNX_FILE))

    def _run(self, input_ids: np.ndarray, position: int, pad: np.ndarray | None) -> np.ndarray:
        if pad is None:
            pad = np.zeros(input_ids.shape[0], np.int64)
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(input_ids),
                 "start_pos": ort.OrtValue.ortvalue_from_numpy(np.array(position, np.int64)),
                 "pad": ort.OrtValue.ortvalue_from_numpy(pad)}
        feeds.update((i.name, value) for i, value in zip(self.cache_inputs, self._cache))
        logits, *self._cache = self.session.run_with_ort_values(self.output_names, feeds)
        return logits.numpy()

    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        batch = input_ids.shape[0]
        self._cache = [ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, *i.shape[1:]), np.float32)) for i in self.cache_inputs]
        return self._run(input_ids, 0, pad)

    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        return self._run(input_ids, position, pad)
