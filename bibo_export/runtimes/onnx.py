"""ONNX Runtime on an exported folder (``bibo-export export onnx``).

The graph is ``(input_ids, start_pos, *cache) → (logits, *new cache)``; the runtime keeps the
cache between calls as ORT values, so decoding never copies it through numpy.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..config import BiBoConfig
from ..export.manifest import check_manifest
from .base import Runtime

MODEL_FILE = "model.onnx"


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, session: ort.InferenceSession, config: BiBoConfig,
                 max_length: int, precision: str = "fp32") -> None:
        super().__init__(config, max_length)
        self.session, self.precision = session, precision
        self.cache_inputs = session.get_inputs()[2:]
        self.output_names = [o.name for o in session.get_outputs()]
        self._cache: list[ort.OrtValue] = []

    @classmethod
    def from_folder(cls, path: str | Path, check: bool = True,
                    options: ort.SessionOptions | None = None) -> OnnxRuntime:
        """Load ``path/model.onnx``; ``check`` first confirms every file against the manifest,
        so a truncated graph or missing external data is reported as such."""
        path = Path(path)
        if check:
            check_manifest(path)
        try:
            session = ort.InferenceSession(str(path / MODEL_FILE), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for unreadable models
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load {path / MODEL_FILE}: {reason}") from None
        meta = session.get_modelmeta().custom_metadata_map
        if "bibo.config" not in meta:
            raise ValueError(f"{path / MODEL_FILE} is not a bibo-export model (no bibo.config)")
        config = BiBoConfig.from_dict(json.loads(meta["bibo.config"]))
        return cls(session, config, int(meta["bibo.max_length"]),
                   meta.get("bibo.precision", "fp32"))

    def _run(self, input_ids: np.ndarray, position: int) -> np.ndarray:
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(input_ids),
                 "start_pos": ort.OrtValue.ortvalue_from_numpy(np.array(position, np.int64))}
        feeds.update((i.name, value) for i, value in zip(self.cache_inputs, self._cache))
        logits, *self._cache = self.session.run_with_ort_values(self.output_names, feeds)
        return logits.numpy()

    def _prefill(self, input_ids: np.ndarray) -> np.ndarray:
        batch = input_ids.shape[0]
        self._cache = [ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, *i.shape[1:]), np.float32)) for i in self.cache_inputs]
        return self._run(input_ids, 0)

    def _decode(self, input_ids: np.ndarray, position: int) -> np.ndarray:
        return self._run(input_ids, position)


# ------------------------------------------------------------------------------ decode cost
def node_weights(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Node name → {weight initializer it reads: bytes}, If branches included."""
    from ..export.onnx import subgraphs

    graphs = list(subgraphs(model.graph))
    sizes = {init.name: tensor_bytes(init) for graph in graphs for init in graph.initializer}
    return {node.name: {name: sizes[name] for name in node.input if name in sizes}
            for graph in graphs for node in graph.node}


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def weights_read_per_call(folder: str | Path, input_ids: np.ndarray,
                          max_new_tokens: int) -> list[dict[str, int]]:
    """Generate with ORT's profiler on and return, per session run (prefill, then each decode
    step), the weights that the nodes ORT actually executed read, in bytes.

    Nodes inside an ``If`` branch that was not taken never run, so unselected experts are
    absent. A Gather reads only the rows it looks up (one per token), not its whole table.
    """
    folder = Path(folder)
    weights = node_weights(onnx.load(folder / MODEL_FILE, load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        runtime = OnnxRuntime.from_folder(folder, check=False, options=options)
        runtime.generate(input_ids, max_new_tokens)
        events = json.loads(Path(runtime.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "model_run")
    calls: list[dict[str, int]] = [{} for _ in runs]
    for event in events:
        if event.get("cat") != "Node":
            continue
        node = event["name"].removesuffix("_kernel_time").split("/")[0]
        call = next(i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end)
        for name, size in weights.get(node, {}).items():
            if event["args"].get("op_name") == "Gather":  # an embedding lookup reads its rows
                table = event["args"]["input_type_shape"][0]
                rows = int(np.prod(next(iter(event["args"]["output_type_shape"][0].values()))[:-1]))
                size = size // next(iter(table.values()))[0] * rows
            calls[call][name] = size
    return calls
