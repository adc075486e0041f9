"""Memory a config needs, estimated from its sizes before anything is allocated, and the check
that refuses, in one line, what this machine cannot hold (instead of an allocator's traceback
minutes later)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .config import BiBoConfig

FP32_BYTES = 4
# Training keeps, per parameter: fp32 weights, gradients and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * FP32_BYTES
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


class OutOfMemoryError(ValueError):
    """A config's estimated memory exceeds the machine's."""


def parameter_count(config: BiBoConfig) -> int:
    """The parameters a model of ``config`` has (embedding, layers, final norm, LM head),
    counted from the config alone."""
    h, d, m = config.hidden_size, config.head_dim, config.moe_intermediate_size
    heads, kv_heads, n = config.num_attention_heads, config.num_key_value_heads, \
        config.num_routed_experts
    attention = 2 * h * heads * d + 2 * h * kv_heads * d + 2 * d \
        + (heads if config.use_ssmax else 0) \
        + ((heads + 2 * kv_heads) * d + h if config.attention_bias else 0)
    router = h * n * (config.kernel_size if config.router_type == "conv" else 1)
    moe = router + 3 * config.num_mlp_experts * h * m + h * m * config.kernel_size + 2 * h * m
    dense = 3 * h * config.intermediate_size
    dense_layers = len(set(config.mlp_only_layers or ()))
    layers = config.num_hidden_layers * (attention + 2 * h) + dense_layers * dense \
        + (config.num_hidden_layers - dense_layers) * moe
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers + h


def training_activation_bytes(config: BiBoConfig, batch_size: int, sequence_length: int) -> int:
    """A floor for what one training step's activations take in fp32: per token and layer
    about 34·h values plus 5·heads·T attention scores (the usual transformer count), and the
    logits with their softmax and gradient."""
    tokens = batch_size * sequence_length
    per_layer = 34 * config.hidden_size + 5 * config.num_attention_heads * sequence_length
    return FP32_BYTES * tokens * (config.num_hidden_layers * per_layer + 3 * config.vocab_size)


def machine_memory_bytes() -> int:
    """Physical memory, or this process's cgroup limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = CGROUP_LIMIT.read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    return total


def gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB"


def check_memory(needed: int, what: str) -> None:
    """Refuse ``what`` when ``needed`` bytes exceed the machine's memory."""
    available = machine_memory_bytes()
    if needed > available:
        raise OutOfMemoryError(f"{what} needs at least {gigabytes(needed)} of memory, more than "
                               f"this machine's {gigabytes(available)}: choose smaller sizes")


def check_model_fits(config: BiBoConfig) -> None:
    params = parameter_count(config)
    check_memory(FP32_BYTES * params, f"a model of {params / 1e6:,.1f}M parameters")


def check_training_fits(config: BiBoConfig, batch_size: int, sequence_length: int) -> None:
    params = parameter_count(config)
    check_memory(TRAINING_BYTES_PER_PARAMETER * params
                 + training_activation_bytes(config, batch_size, sequence_length),
                 f"training {params / 1e6:,.1f}M parameters on batches of {batch_size} × "
                 f"{sequence_length} tokens")
