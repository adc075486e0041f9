"""ONNX Runtime on an exported folder (``bibo-export export onnx``).

The graph is ``(input_ids, start_pos, pad, *cache) → (logits, *new cache)``; the runtime keeps
the cache between calls as ORT values, so decoding never copies it through numpy. Where the
graph allows it (``cache_written_in_place``), each new key and value cache is the old one's
buffer: its write then updates the cache in place instead of copying all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..artifacts import ONNX_FILE, ArtifactMetadata, check_manifest
from .base import Runtime

METADATA_KEY = "bibo.metadata"  # ArtifactMetadata as JSON, in the model's metadata properties
PRESENT = "present."  # a cache output's name: this prefix and its input's name


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, session: ort.InferenceSession, metadata: ArtifactMetadata,
                 in_place: frozenset[str] = frozenset()) -> None:
        """``in_place``: the cache inputs whose new value may be written into their buffer."""
        super().__init__(metadata.config, metadata.max_length)
        self.session, self.precision = session, metadata.precision
        self.cache_inputs = session.get_inputs()[3:]  # after input_ids, start_pos, pad
        self.output_names = [o.name for o in session.get_outputs()]
        self.in_place = in_place
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
        graph = onnx.load(path / ONNX_FILE, load_external_data=False).graph  # weights stay out
        return cls(session, ArtifactMetadata.from_json(meta[METADATA_KEY], path / ONNX_FILE),
                   cache_written_in_place(graph))

    def _run(self, input_ids: np.ndarray, position: int, pad: np.ndarray | None) -> np.ndarray:
        if pad is None:
            pad = np.zeros(input_ids.shape[0], np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("start_pos", np.array(position, np.int64))
        binding.bind_cpu_input("pad", pad)
        reused = {}
        for cache_input, value in zip(self.cache_inputs, self._cache):
            binding.bind_ortvalue_input(cache_input.name, value)
            if cache_input.name in self.in_place:
                reused[PRESENT + cache_input.name] = value
        for name in self.output_names:
            if name in reused:
                binding.bind_ortvalue_output(name, reused[name])
            else:
                binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        logits, *outputs = binding.get_outputs()
        # Keep the values bound in place, not the outputs that view them: those do not own
        # their buffer, which would be freed with the value they replaced.
        self._cache = [reused.get(name, output)
                       for name, output in zip(self.output_names[1:], outputs)]
        return logits.numpy()

    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        batch = input_ids.shape[0]
        self._cache = [ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch, *i.shape[1:]), np.float32)) for i in self.cache_inputs]
        return self._run(input_ids, 0, pad)

    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        return self._run(input_ids, position, pad)


def cache_written_in_place(graph: onnx.GraphProto) -> frozenset[str]:
    """The cache inputs that only the ``ScatterElements`` writing their new value
    (``present.<name>``) reads (``Shape`` aside, which reads no values). Their new value may
    share their buffer: no node reads the old values after the write, and ORT's scatter kernels
    copy their input to their output only when the two buffers differ (the whole cache per
    layer and step otherwise)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for inner in subgraphs(graph):
        for node in inner.node:
            for name in set(node.input):
                readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    in_place = set()
    for graph_input in graph.input:
        writes = [node for node in readers.get(graph_input.name, []) if node.op_type != "Shape"]
        if (len(writes) == 1 and writes[0].op_type == "ScatterElements"
                and writes[0].input[0] == graph_input.name
                and writes[0].output[0] == PRESENT + graph_input.name
                and writes[0].output[0] in outputs):
            in_place.add(graph_input.name)
    return frozenset(in_place)


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes (If branches), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
