"""Small configurations and oracles shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bibo_export.config import BiBoConfig


def tiny_config(**overrides: Any) -> BiBoConfig:
    """A few-layer BiBo with every feature on (conv router, SSMax, MoE and dense layers)."""
    values: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_routed_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=24, max_position_embeddings=128,
        router_type="conv", mlp_only_layers=[0], bias_update_threshold=800)
    values.update(overrides)
    return BiBoConfig(**values)


def swiglu_reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """One expert on one token, written out with plain matrix-vector products."""
    return down @ (F.silu(gate @ x) * (up @ x))


def train_sort_tiny(out_dir, steps: int = 250, lengths=(6,), lr: float = 3e-3):
    """Briefly train the sort-tiny preset on the sorting task (eager CPU, seeded) and save it.

    Returns (checkpoint folder, SortingTask). Int8 parity is only meaningful on a model that
    has learned something (DESIGN §7), so the export tests share one such model per session.
    """
    import math

    from bibo_export.model import BiBoForCausalLM
    from bibo_export.train.sorting import SortingTask
    from bibo_export.train.step import train_step

    torch.manual_seed(48)
    model = BiBoForCausalLM(BiBoConfig.preset("sort-tiny", capacity_factor=1.25)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    task = SortingTask(lengths=lengths, batch_size=32)
    for _, (input_ids, labels) in zip(range(steps), task.train_batches()):
        train_step(model, optimizer, input_ids, labels)
        schedule.step()
    model.save_pretrained(out_dir)
    return out_dir, task
