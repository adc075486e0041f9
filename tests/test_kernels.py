"""BiBo's ExecuTorch kernels against the operators' PyTorch implementations, and those against
independent formulations: the experts (``bibo::moe_experts``, ``…_int8``, ``…_int4``) against
plain per-token expert sums (int4 nibbles unpacked here, in NumPy), attention over the cache
(``bibo::update_cache``, ``bibo::cache_attention``) against the model's own cache write and
masked attention.

The C++ kernels only run inside an ExecuTorch program, so each case exports a small program
(no delegate: the operators stay kernel calls) with a dynamic token count.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from executorch.exir import to_edge_transform_and_lower
from executorch.runtime import Runtime
from helpers import ARM_CPUS, runner_target, swiglu_reference
from torch import Tensor, nn

from bibo_export.config import BiBoConfig
from bibo_export.export.transforms import CacheAttention, InPlaceCacheWrite
from bibo_export.kernels.library import KernelCounters, load_kernels, read_counters
from bibo_export.kernels.moe_experts import (pack_int4, quantize_groups, quantize_rows,
                                             unpack_int4)
from bibo_export.model.attention import AttentionInputs, GroupedAttention, TokenPositions
from bibo_export.model.layers import CacheWrite
from bibo_export.runtimes.cpp_runner import run_cpp_runner

pytestmark = pytest.mark.export

# Widths past every kernel's vector steps, with tails: 202 rows leave 2 after blocks of 4; as
# columns, 202 and 168 leave 10 and 8 after int8's 32-byte (x86) and 16-byte (Arm) steps, and
# 10 and 40 after int4's 64-column (x86) and 32-column (Arm) ones.
EXPERTS, WIDTH, HIDDEN, MAX_TOKENS = 5, 202, 168, 64
ROUTED = EXPERTS + 3  # indices ≥ EXPERTS are BiBo's parameter-free experts: skipped
# int4 groups of 32: 168 columns are 5 groups and a partial one, 202 are 6 and a partial one
# (an odd count). Groups of 96 (a multiple of 32, not of a vector step) change group inside
# x86's 64-column steps.
GROUP = 32


class ExpertsCall(nn.Module):
    """The operator alone, on fixed random expert weights, in ``precision`` fp32/int8/int4."""

    def __init__(self, precision: str, hidden: int = HIDDEN, width: int = WIDTH,
                 group: int = GROUP) -> None:
        super().__init__()
        self.group = group
        torch.manual_seed(0)
        weights = {"gate": torch.randn(EXPERTS, width, hidden) / hidden ** 0.5,
                   "up": torch.randn(EXPERTS, width, hidden) / hidden ** 0.5,
                   "down": torch.randn(EXPERTS, hidden, width) / width ** 0.5}
        self.precision = precision
        for name, weight in weights.items():
            if precision == "fp32":
                self.register_buffer(name, weight)
                continue
            if precision == "int8":
                q, scale = quantize_rows(weight)
            else:
                q, scale = quantize_groups(weight, group)
                q = pack_int4(q)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)

    def one_expert(self, x: Tensor, e: int) -> Tensor:
        """Expert e on one token x [h], written out from the operator's definition."""
        if self.precision == "fp32":
            return swiglu_reference(x, self.gate[e], self.up[e], self.down[e])
        def product(v: Tensor, name: str) -> Tensor:
            weight, scale = getattr(self, name)[e], getattr(self, f"{name}_scale")[e]
            if self.precision == "int8":
                return int8_product(v, weight, scale)
            return int4_product(v, weight, scale, self.group)
        return product(F.silu(product(x, "gate")) * product(x, "up"), "down")

    def forward(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        if self.precision == "fp32":
            return torch.ops.bibo.moe_experts(x, indices, weights, self.gate, self.up, self.down)
        scaled = (self.gate, self.gate_scale, self.up, self.up_scale, self.down, self.down_scale)
        if self.precision == "int8":
            return torch.ops.bibo.moe_experts_int8(x, indices, weights, *scaled)
        return torch.ops.bibo.moe_experts_int4(x, indices, weights, *scaled, self.group)


def program(module: ExpertsCall, top_k: int, path: Path):
    """The module as an ExecuTorch program with a dynamic token count, loaded."""
    load_kernels()
    tokens = torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    example = (torch.zeros(2, module.down.shape[1]), torch.zeros(2, top_k, dtype=torch.long),
               torch.zeros(2, top_k))
    exported = torch.export.export(module, example,
                                   dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    path.write_bytes(to_edge_transform_and_lower(exported).to_executorch().buffer)
    return Runtime.get().load_program(path).load_method("forward")


def int8_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """One token x [in] rounded to int8 with its own scale (max |x| / 127)."""
    x_scale = x.abs().max().clamp(min=1e-12) / 127
    return torch.round(x / x_scale).clamp(-127, 127).long(), x_scale


def int8_product(x: Tensor, q_weight: Tensor, scale: Tensor) -> Tensor:
    """One token x [in] times int8 rows [out, in] with their scales: x as ``int8_token``, the
    integer products summed in int64, then both scales."""
    q, x_scale = int8_token(x)
    return (q_weight.long() * q).sum(-1).float() * x_scale * scale


def nibbles(packed: Tensor, columns: int) -> np.ndarray:
    """Packed int4 rows [out, ⌈in/2⌉] as int64 [out, in], byte by byte: the low nibble is the
    even column, the high one the odd column, each a 4-bit two's complement."""
    data = packed.numpy().astype(np.int64)
    pairs = np.stack([data % 16, data // 16], axis=-1).reshape(*data.shape[:-1], -1)
    return np.where(pairs >= 8, pairs - 16, pairs)[..., :columns]


def int4_product(x: Tensor, packed: Tensor, scale: Tensor, group: int) -> Tensor:
    """One token x [in] times packed int4 rows with a scale per ``group`` columns: x as
    ``int8_token``, each group's integer products summed in int64 and scaled by the group's
    scale, the groups summed, then x's scale."""
    q, x_scale = int8_token(x)
    products = nibbles(packed, len(x)) * q.numpy()
    out = torch.zeros(packed.shape[0])
    for g, start in enumerate(range(0, len(x), group)):
        group_sum = torch.from_numpy(products[:, start:start + group].sum(-1)).float()
        out += group_sum * scale[:, g]
    return out * x_scale


def per_token_sum(module: ExpertsCall, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The operator's definition read literally: token by token, choice by choice."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t]):
            if e < EXPERTS:
                out[t] += w * module.one_expert(x[t], e)
    return out


def routing(tokens: int, top_k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    indices = torch.randint(0, ROUTED, (tokens, top_k), generator=generator)
    return x, indices, torch.rand(tokens, top_k, generator=generator)


CASES = {  # name: (tokens, top_k, seed) or explicit indices
    "decode": (1, 3, 1),
    "prefill": (MAX_TOKENS, 3, 2),  # big enough to split rows over the threadpool
    "k=1": (9, 1, 3),
    "k=n": (6, ROUTED, 4),
}


def case_inputs(name: str) -> tuple[Tensor, Tensor, Tensor]:
    if name == "repeated and parameter-free":
        x, _, weights = routing(3, 3, 5)
        # token 0 picks expert 2 twice, token 1 only parameter-free experts, token 2 mixes.
        indices = torch.tensor([[2, 2, 0], [EXPERTS, EXPERTS + 1, EXPERTS + 2], [4, EXPERTS, 1]])
        return x, indices, weights
    return routing(*CASES[name])


@pytest.fixture(scope="module", params=["fp32", "int8", "int4", "int4 group 96"])
def kernel(request, tmp_path_factory):
    """(reference module, {top_k: loaded program}) for one precision (int4: and group)."""
    precision, _, group = request.param.partition(" group ")
    module = ExpertsCall(precision, group=int(group or GROUP))
    folder = tmp_path_factory.mktemp(f"kernel-{request.param.replace(' ', '-')}")
    methods = {k: program(module, k, folder / f"k{k}.pte") for k in {1, 3, ROUTED}}
    return module, methods


@pytest.mark.parametrize("case", [*CASES, "repeated and parameter-free"])
def test_kernel_equals_the_operator_reference(kernel, case):
    """The kernel equals the PyTorch operator, and the operator the per-token sum, to 1e-5. In
    int8 both round the same activations to the same integers and sum the products exactly,
    so they differ by float rounding only; int4 too, group by group."""
    module, methods = kernel
    x, indices, weights = case_inputs(case)
    got = methods[indices.shape[1]].execute([x, indices, weights])[0]
    expected = module(x, indices, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, per_token_sum(module, x, indices, weights),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision, bound", [("int8", 0.03), ("int4", 0.2)])
def test_integer_operators_stay_near_the_float_weights(precision, bound):
    """Int8 weight rows (one scale each) and int8 token activations keep the experts' output
    within 3 % of the float operator's (2.1 % measured); int4 weights (a scale per group of 32)
    within 20 % (16.6 % measured): 16 levels where int8 has 255, so each random weight rounds
    by about 8 % of its spread, and an expert's two products compound it."""
    x, indices, weights = routing(16, 3, 6)
    float_out = ExpertsCall("fp32")(x, indices, weights)
    integer_out = ExpertsCall(precision)(x, indices, weights)
    assert (integer_out - float_out).norm() <= bound * float_out.norm()


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 41), (1, 7)])
def test_int4_packing_round_trip(shape):
    """Weights quantized to groups, packed two to a byte and unpacked (by the library, and
    byte by byte here) give back the same integers; each weight is within half a step of its
    group's scale, and the integers use [-8, 7]. Odd widths pad the last byte's high nibble."""
    generator = torch.Generator().manual_seed(len(shape))
    weight = torch.randn(*shape, generator=generator)
    q, scale = quantize_groups(weight, 4)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (shape[-1] + 1) // 2
    assert torch.equal(unpack_int4(packed, shape[-1]), q)
    np.testing.assert_array_equal(nibbles(packed.reshape(-1, packed.shape[-1]), shape[-1]),
                                  q.reshape(-1, shape[-1]).numpy())
    steps = scale.repeat_interleave(4, -1)[..., :shape[-1]]
    assert ((weight - q * steps).abs() <= steps / 2 * (1 + 1e-5)).all()
    assert q.min() >= -8 and q.max() <= 7
    if shape[-1] % 2:
        assert (packed[..., -1] >> 4 == 0).all()


def test_int4_groups_use_the_whole_range():
    """A group's largest magnitude is 7.5 steps: -8 where it is negative, 7 where positive."""
    q, scale = quantize_groups(torch.tensor([[-7.5, 3.2, 2.6, 7.5]]), 2)
    assert q.tolist() == [[-8, 3, 3, 7]] and scale.tolist() == [[1.0, 1.0]]


def test_int4_group_size_must_be_even():
    with pytest.raises(ValueError, match="group size must be an even number"):
        quantize_groups(torch.randn(4, 8), 3)


@pytest.mark.parametrize("case", ["decode", "prefill", "repeated and parameter-free"])
def test_kernel_reads_each_chosen_expert_once(kernel, case):
    """The kernel's own counters: one pass over each distinct chosen MLP expert's weights
    (with its scales for int8) per call, however many tokens chose it; nothing else."""
    module, methods = kernel
    x, indices, weights = case_inputs(case)
    chosen = {e for e in indices.flatten().tolist() if e < EXPERTS}
    per_expert = sum(getattr(module, n)[0].numel() * getattr(module, n).element_size() +
                     (getattr(module, f"{n}_scale")[0].numel() * 4
                      if module.precision != "fp32" else 0)
                     for n in ("gate", "up", "down"))
    read_counters(reset=True)
    methods[indices.shape[1]].execute([x, indices, weights])
    assert read_counters() == KernelCounters(len(chosen) * per_expert, len(chosen))


class RoutedTokens(nn.Module):
    """The experts operator behind the C++ runner's contract, forward(tokens [1, T], input_pos
    [1]) → [1, T, h]: token i stands for row i of fixed inputs and routing, so the runner
    computes the kernel on them (its "logits" are the experts' output)."""

    def __init__(self, experts: ExpertsCall, x: Tensor, indices: Tensor,
                 weights: Tensor) -> None:
        super().__init__()
        self.experts = experts
        for name, table in (("x", x), ("indices", indices), ("weights", weights)):
            self.register_buffer(f"{name}_table", table)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        rows = tokens[0]
        return self.experts(self.x_table[rows], self.indices_table[rows],
                            self.weights_table[rows])[None]


@pytest.mark.parametrize("cpu", ARM_CPUS)
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("case", ["k=1", "k=n", "repeated and parameter-free", "decode"])
def test_the_arm_integer_kernel_paths_equal_the_reference(cpu, precision, case, tmp_path):
    """The aarch64 build of the int8 and int4 kernels (sdot on neoverse-n1, NEON on
    cortex-a53, under qemu-user) equals the operator's reference and the per-token sums, as
    the x86 one does."""
    where = runner_target(cpu)
    module = ExpertsCall(precision)
    x, indices, weights = case_inputs(case)
    path = tmp_path / "experts.pte"
    exported = torch.export.export(RoutedTokens(module, x, indices, weights),
                                   (torch.zeros(1, len(x), dtype=torch.long), torch.tensor([0])))
    path.write_bytes(to_edge_transform_and_lower(exported).to_executorch().buffer)
    done = run_cpp_runner(path, [list(range(len(x)))], 1, logits=True, **where)
    assert done.int8_path == ARM_CPUS[cpu]
    got = torch.from_numpy(done.logits)
    torch.testing.assert_close(got, module(x, indices, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, per_token_sum(module, x, indices, weights),
                               rtol=1e-5, atol=1e-5)


def test_missing_compiler_is_a_one_line_error():
    """make's check before the kernel build names the missing tool in one line."""
    root = Path(__file__).resolve().parents[1]
    for variable, tool in (("CXX", "no-such-c++"), ("CMAKE", "no-such-cmake")):
        done = subprocess.run(["make", "--no-print-directory", "-s", "check-kernel-tools",
                               f"{variable}={tool}"], cwd=root, capture_output=True, text=True)
        assert done.returncode != 0
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and tool in errors[0], done.stderr


# ------------------------------------------------------------------------------ attention
HEADS, HEAD_DIM, SLOTS = 8, 12, 24  # a head size that is not a multiple of 8: the dot's tail


class CacheCalls(nn.Module):
    """A program's attention over its cache, alone: each call writes its keys and values into
    the cache (a mutable buffer) in place and attends over it, from slot ``input_pos``."""

    def __init__(self, kv_heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        for name in ("key", "value"):
            self.register_buffer(name, torch.zeros(1, kv_heads, SLOTS, HEAD_DIM, dtype=dtype),
                                 persistent=False)
        self.write, self.attend = InPlaceCacheWrite(), CacheAttention()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        slots = input_pos[0] + torch.arange(q.shape[2])
        k = self.write(self.key, slots, k)
        v = self.write(self.value, slots, v)
        return self.attend(q, k, v, attention_inputs(slots), 0.3)


def attention_inputs(slots: Tensor, dtype: torch.dtype = torch.float32) -> AttentionInputs:
    return AttentionInputs.of(TokenPositions(slots), BiBoConfig.preset("sort-tiny"),
                              torch.arange(SLOTS), dtype)


# One KV head, grouped, one per query head; and bf16 (bf16 programs), computed in float by the
# kernel, by PyTorch in bf16: they then differ by bf16's rounding (2^-8 relative).
@pytest.mark.parametrize("kv_heads, dtype, tolerance", [
    (1, torch.float32, 1e-5), (2, torch.float32, 1e-5), (8, torch.float32, 1e-5),
    (2, torch.bfloat16, 2e-2)])
def test_cache_kernels_equal_the_models_cache_and_masked_attention(kv_heads, dtype, tolerance,
                                                                   tmp_path):
    """A prefill of 5, decode steps, a chunk of 4, a prefill of 7 that starts a new sequence
    over stale slots, and a call that ends at the cache's last slot: each call's output, from
    the C++ kernels, equals the model's ``CacheWrite`` + masked ``GroupedAttention`` over a cache
    kept the same way in PyTorch."""
    load_kernels()
    calls = torch.export.Dim("calls", min=1, max=SLOTS)
    example = (torch.zeros(1, HEADS, 2, HEAD_DIM, dtype=dtype),
               torch.zeros(1, kv_heads, 2, HEAD_DIM, dtype=dtype),
               torch.zeros(1, kv_heads, 2, HEAD_DIM, dtype=dtype), torch.tensor([0]))
    exported = torch.export.export(CacheCalls(kv_heads, dtype), example,
                                   dynamic_shapes=({2: calls}, {2: calls}, {2: calls}, None))
    path = tmp_path / "attention.pte"
    path.write_bytes(to_edge_transform_and_lower(exported).to_executorch().buffer)
    method = Runtime.get().load_program(path).load_method("forward")
    generator = torch.Generator().manual_seed(kv_heads)
    key, value = torch.zeros(2, 1, kv_heads, SLOTS, HEAD_DIM, dtype=dtype).unbind(0)
    for start, length in [(0, 5), (5, 1), (6, 1), (7, 4), (0, 7), (7, 1), (SLOTS - 3, 3)]:
        q = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator).to(dtype)
        k, v = torch.randn(2, 1, kv_heads, length, HEAD_DIM, generator=generator).to(dtype)
        got = method.execute([q, k, v, torch.tensor([start])])[0]
        slots = torch.arange(start, start + length)
        key, value = CacheWrite()(key, slots, k), CacheWrite()(value, slots, v)
        want = GroupedAttention()(q, key, value, attention_inputs(slots, dtype), 0.3)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
