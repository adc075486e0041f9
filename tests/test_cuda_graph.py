"""The whole-step CUDA graph (``--compile-mode step-graph``) on the CPU: torch.cuda's graph and
stream API is replaced by fakes that keep CUDA's contract (captured work does not happen; a
replay runs it again on the captured input buffers and writes the captured outputs). The oracle
is the same train step called directly. On a GPU, ``bench.train``'s ``max_loss_gap`` compares
the real graph with the other compile modes."""

import contextlib

import pytest
import torch

from bibo_export.model import BiBoForCausalLM
from bibo_export.train.cuda_graph import GraphedStep
from bibo_export.train.optim import build_optimizer, initialize_state
from bibo_export.train.step import TrainStep
from helpers import tiny_config


class FakeStream:
    def wait_stream(self, other: "FakeStream") -> None:
        pass


def fake_cuda(monkeypatch, graphed: GraphedStep, state: list[torch.Tensor]) -> None:
    """While "captured", the step runs (Python cannot stop that) and then every tensor of the
    training state is put back, so the capture leaves no trace, as on CUDA."""
    class FakeGraph:
        def replay(self) -> None:
            for name, value in graphed.step(*graphed.inputs).items():
                graphed.outputs[name].copy_(value)

    @contextlib.contextmanager
    def capture(graph: FakeGraph):
        before = [t.clone() for t in state]
        yield
        for tensor, value in zip(state, before):
            tensor.copy_(value)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)


def train(monkeypatch, graphed: bool, calls: int = 5):
    """Per call, the metrics returned (read after the last call) and the final weights."""
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).train()
    lr, counter = torch.tensor(1e-2), torch.zeros(())
    optimizer = build_optimizer(model, lr, 0.01, "cpu")
    initialize_state(optimizer)
    step = TrainStep(model, optimizer, lr, counter, lambda _: lr, grad_clip=1.0)
    if graphed:
        step = GraphedStep(step)
        moments = [v for s in optimizer.state.values() for v in s.values()]
        fake_cuda(monkeypatch, step, [*model.state_dict().values(), *moments, lr, counter])
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (1, 4, 9), generator=generator) for _ in range(calls)]
    metrics = [step(ids, ids) for ids in batches]
    return metrics, {name: value.clone() for name, value in model.state_dict().items()}


def test_every_call_is_one_step_on_its_own_batch(monkeypatch):
    """Warm-up calls, the capturing call and replays each train one step on the batch given,
    and each call's metrics stay its own after later replays."""
    metrics, weights = train(monkeypatch, graphed=True)
    oracle_metrics, oracle_weights = train(monkeypatch, graphed=False)
    for call, (got, expected) in enumerate(zip(metrics, oracle_metrics, strict=True)):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6,
                                       msg=f"call {call + 1}: {name}")
    for name in oracle_weights:  # the router's bias and counters included
        torch.testing.assert_close(weights[name], oracle_weights[name], rtol=0, atol=1e-6,
                                   msg=name)


def test_a_replay_refuses_other_shapes(monkeypatch):
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config()).train()
    lr = torch.tensor(1e-2)
    optimizer = build_optimizer(model, lr, 0.01, "cpu")
    graphed = GraphedStep(TrainStep(model, optimizer, lr, torch.zeros(()), lambda _: lr, 1.0),
                          warmup_calls=0)
    fake_cuda(monkeypatch, graphed, list(model.state_dict().values()))
    ids = torch.randint(0, 64, (1, 4, 9))
    graphed(ids, ids)
    with pytest.raises(ValueError, match=r"captured with, \(1, 4, 9\), not \(1, 4, 8\)"):
        graphed(ids[..., :8], ids[..., :8])
