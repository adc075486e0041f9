"""ONNX Runtime on an exported folder (``bibo-export export onnx``).

The graph is ``(input_ids, start_pos, pad, *cache) → (logits, *new cache)``; the runtime keeps
the cache between calls as ORT values, so decoding never copies it through numpy. Where the
graph allows it (``cache_written_in_place``), each new key and value cache is the old one's
buffer: its write then updates the cache in place instead of copying all of it. The other cache
entries (the convolutions' states) live in two sets of buffers that calls read and write in
turn, so every decode step runs one of two ``IOBinding``s bound once per sequence, its token and
position written into the buffers they read, and it fetches no output object. Binding each step
anew, as before, made `bench`'s int8 decode 1.14–1.19× slower (1 thread, 2026-11-28), with
identical tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..artifacts import ONNX_FILE, ArtifactMetadata, check_manifest
from ..threads import thread_share
from .base import Runtime

METADATA_KEY = "bibo.metadata"  # ArtifactMetadata as JSON, in the model's metadata properties
PRESENT = "present."  # a cache output's name: this prefix and its input's name


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """``options`` for one of our sessions: this process's share of the cores, unless the
    caller set a thread count (0 is ORT's default, a thread per core)."""
    options = options or ort.SessionOptions()
    if not options.intra_op_num_threads:
        options.intra_op_num_threads = thread_share()
    return options


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, session: ort.InferenceSession, metadata: ArtifactMetadata,
                 in_place: frozenset[str] = frozenset()) -> None:
        """``in_place``: the cache inputs whose new value may be written into their buffer."""
        super().__init__(metadata.config, metadata.max_length)
        self.session, self.precision = session, metadata.precision
        self.cache_inputs = session.get_inputs()[3:]  # after input_ids, start_pos, pad
        self.output_names = [o.name for o in session.get_outputs()]
        # Outputs past the logits and the cache (a graph extended for a measurement), bound
        # anew at every call and read back into ``extra_outputs``.
        self.extra_names = self.output_names[1 + len(self.cache_inputs):]
        self.extra_outputs: list[ort.OrtValue] = []
        self.in_place = in_place
        self._sequence: DecodeBuffers | None = None

    @classmethod
    def from_path(cls, path: str | Path, check: bool = True,
                    options: ort.SessionOptions | None = None) -> OnnxRuntime:
        """Load ``path/model.onnx``; ``check`` first confirms every file against the manifest,
        so a truncated graph or missing external data is reported as such."""
        path = Path(path)
        if check:
            check_manifest(path)
        try:
            session = ort.InferenceSession(str(path / ONNX_FILE), session_options(options),
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

    def _prefill(self, input_ids: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        self._sequence = sequence = DecodeBuffers(self, input_ids.shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("start_pos", np.array(0, np.int64))
        binding.bind_cpu_input("pad", sequence.pad if pad is None else pad)
        binding.bind_output("logits")  # [B, T, V]: T differs from the decode steps'
        sequence.bind_cache(binding, call=0)
        self._run(binding)
        return binding.get_outputs()[0].numpy()

    def _decode(self, input_ids: np.ndarray, position: int,
                pad: np.ndarray | None) -> np.ndarray:
        sequence = self._sequence
        assert sequence is not None, "a sequence starts with _prefill"
        sequence.token[...] = input_ids
        sequence.position[...] = position
        sequence.pad[...] = 0 if pad is None else pad
        self._run(sequence.next_step())
        return sequence.logits.copy()  # the next step writes into the bound buffer

    def _run(self, binding: ort.IOBinding) -> None:
        self.session.run_with_iobinding(binding)
        if self.extra_names:  # else a decode step reads no output object: the logits are bound
            outputs = binding.get_outputs()
            self.extra_outputs = outputs[len(outputs) - len(self.extra_names):]


class DecodeBuffers:
    """One sequence's buffers: the cache in two sets that calls alternate between (the entries
    written in place are the same buffer in both), and the inputs and logits of a decode step,
    which its two bindings read and write where they are."""

    def __init__(self, runtime: OnnxRuntime, batch: int) -> None:
        self.runtime = runtime
        cache = [np.zeros((batch, *i.shape[1:]), np.float32) for i in runtime.cache_inputs]
        spare = [array if i.name in runtime.in_place else np.zeros_like(array)
                 for i, array in zip(runtime.cache_inputs, cache)]
        self.token = np.zeros((batch, 1), np.int64)
        self.position = np.zeros((), np.int64)
        self.pad = np.zeros(batch, np.int64)
        self.logits = np.zeros((batch, 1, runtime.config.vocab_size), np.float32)
        # An OrtValue made from a numpy array uses the array's memory (and holds the array).
        self.sets = [[ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
                     for arrays in (cache, spare)]
        self.steps = [self._step_binding(call) for call in (1, 2)]  # the prefill is call 0
        self.decoded = 0

    def bind_cache(self, binding: ort.IOBinding, call: int) -> None:
        """Call ``call`` reads set ``call % 2`` and writes the other."""
        reads, writes = self.sets[call % 2], self.sets[1 - call % 2]
        for cache_input, read, written in zip(self.runtime.cache_inputs, reads, writes):
            binding.bind_ortvalue_input(cache_input.name, read)
            binding.bind_ortvalue_output(PRESENT + cache_input.name, written)
        for name in self.runtime.extra_names:
            binding.bind_output(name)

    def next_step(self) -> ort.IOBinding:
        binding = self.steps[self.decoded % 2]
        self.decoded += 1
        return binding

    def _step_binding(self, call: int) -> ort.IOBinding:
        binding = self.runtime.session.io_binding()
        for name, array in (("input_ids", self.token), ("start_pos", self.position),
                            ("pad", self.pad)):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.bind_cache(binding, call)
        return binding


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
