"""The model as data: ``BiBoConfig`` (the architecture, docs/design.md) and ``ExecutionOptions``
(how the MoE layers compute it: capacity and dispatch, docs/design.md).

``BiBoConfig`` is what ``config.json`` holds. Its fields keep the reference's names; fields left
as ``None`` are derived in ``__post_init__`` and written out resolved, so a saved config fully
determines the model. Capacity and dispatch change how a step computes, not which function the
model is, so they live apart: training records them in ``train_config.json``, and exports and
runtimes compute every selected expert whatever training used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROUTER_TYPES = ("mlp", "conv")
DISPATCH_MODES = ("index", "einsum", "grouped", "dense")
# Checkpoints written before ExecutionOptions existed carry these in config.json.
LEGACY_EXECUTION_KEYS = {"capacity_factor": "capacity_factor", "moe_dispatch": "dispatch"}


@dataclass
class BiBoConfig:
    vocab_size: int = 128000
    hidden_size: int = 1536
    intermediate_size: int = 4104
    num_hidden_layers: int = 8
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_ssmax: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    # Mixture of experts.
    num_routed_experts: int = 16
    num_experts_per_tok: int = 6
    num_shared_experts: int = 1
    moe_intermediate_size: int | None = None
    mlp_only_layers: list[int] | None = None
    router_type: str = "mlp"
    kernel_size: int = 3
    router_lambda: float = 1.0
    router_noise: float = 0.0
    norm_topk_prob: bool = True
    moe_shared_scaling: float | None = None
    bias_update_threshold: int = 8000
    bias_update_factor: float | None = None
    # Optional auxiliary load-balancing loss over the global batch (0: off); see balance_loss.
    aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        self._validate()
        if self.rope_theta is None:
            self.rope_theta = 10000.0 * (self.max_position_embeddings / 4096) ** (4 / 3)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size // self.num_experts_per_tok
        if self.mlp_only_layers is None:
            self.mlp_only_layers = sorted({0, self.num_hidden_layers - 1})
        if self.bias_update_factor is None:
            self.bias_update_factor = hill_bias_update_factor(self.num_routed_experts)
        if self.moe_shared_scaling is None:
            self.moe_shared_scaling = monte_carlo_shared_scaling(
                self.num_routed_experts, self.num_experts_per_tok, self.num_shared_experts,
                self.router_lambda)

    # ----------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_mlp_experts(self) -> int:
        """Routed experts with parameters: indices 0 … n-4 (the last three are parameter-free)."""
        return self.num_routed_experts - 3

    @property
    def ssmax_init(self) -> float:
        return 1.0 / math.log(max(self.max_position_embeddings / 2, 2))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers

    # ----------------------------------------------------------------------------- checks
    def _validate(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"BiBoConfig.{name}={getattr(self, name)!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "kernel_size", "bias_update_threshold"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                    "must be a positive integer")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                f"must be divisible by num_attention_heads={self.num_attention_heads}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
                f"must be divisible by num_key_value_heads={self.num_key_value_heads}")
        require((self.hidden_size // self.num_attention_heads) % 2 == 0, "hidden_size",
                "hidden_size / num_attention_heads (the head dim) must be even for RoPE")
        require(self.hidden_act == "silu", "hidden_act", "only 'silu' is supported")
        require(self.router_type in ROUTER_TYPES, "router_type", f"must be one of {ROUTER_TYPES}")
        require(isinstance(self.num_routed_experts, int) and self.num_routed_experts >= 4,
                "num_routed_experts", "must be an integer >= 4 (three experts are parameter-free)")
        require(isinstance(self.num_experts_per_tok, int)
                and 1 <= self.num_experts_per_tok <= self.num_routed_experts,
                "num_experts_per_tok", f"must be in 1..num_routed_experts={self.num_routed_experts}")
        require(self.num_shared_experts == 1, "num_shared_experts",
                "exactly one shared expert is supported")
        require(self.num_experts_per_tok > self.num_shared_experts, "num_experts_per_tok",
                f"must exceed num_shared_experts={self.num_shared_experts} "
                "(the shared scaling uses the top k-s routed probabilities)")
        require(self.router_noise >= 0, "router_noise", "is a variance and must be >= 0")
        require(isinstance(self.aux_loss_coef, (int, float)) and math.isfinite(self.aux_loss_coef)
                and self.aux_loss_coef >= 0, "aux_loss_coef", "must be a finite number >= 0")
        if self.moe_intermediate_size is not None:
            require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        if self.mlp_only_layers is not None:
            require(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers
                        for i in self.mlp_only_layers), "mlp_only_layers",
                    f"layer indices must be in 0..{self.num_hidden_layers - 1}")

    # ----------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BiBoConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        execution = sorted(set(values) & set(LEGACY_EXECUTION_KEYS))
        if execution:
            raise ValueError(f"{', '.join(execution)} is an execution option, not part of the "
                             "model's config: set it with --capacity-factor / --moe-dispatch "
                             "(ExecutionOptions)")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BiBoConfig key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> tuple[BiBoConfig, ExecutionOptions]:
        """A saved config that may predate ``ExecutionOptions``: its capacity and dispatch keys
        become the execution options instead of an error."""
        values = dict(values)
        legacy = {option: values.pop(key) for key, option in LEGACY_EXECUTION_KEYS.items()
                  if key in values}
        return cls.from_dict(values), ExecutionOptions(**legacy)

    @classmethod
    def from_json(cls, text: str) -> BiBoConfig:
        return cls.from_dict(parse_json_object(text))

    @classmethod
    def from_file(cls, path: str | Path) -> BiBoConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        return cls.from_json(path.read_text())

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BiBoConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


@dataclass(frozen=True)
class ExecutionOptions:
    """How MoE layers compute during training (docs/design.md); not part of the model.

    ``capacity_factor``: slots per parameterised expert are ceil(factor · S · k / n); ``None``
    never drops (inference always uses ``None``). ``dispatch``: ``index`` (gather/scatter),
    ``einsum`` (one-hot masks), ``grouped`` (assignments sorted by expert, grouped matmuls; the
    fastest on CUDA) or ``dense`` (every expert on every token, the oracle). ``grouped`` and
    ``dense`` never drop, whatever the capacity factor.
    """

    capacity_factor: float | None = None
    dispatch: str = "index"

    def __post_init__(self) -> None:
        factor = self.capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not math.isfinite(factor) or factor <= 0):
            raise ValueError(f"capacity_factor={factor!r}: must be None (never drop) or a "
                             "finite number > 0")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"moe_dispatch={self.dispatch!r}: must be one of "
                             f"{', '.join(DISPATCH_MODES)}")

    def expert_capacity(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        """Slots per parameterised expert for a call of ``num_tokens`` tokens (a static int)."""
        if self.capacity_factor is None:
            return num_tokens
        slots = math.ceil(self.capacity_factor * num_tokens * top_k / num_experts)
        return max(1, min(slots, num_tokens))


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError("config JSON must be an object of field: value")
    return values


def hill_bias_update_factor(num_experts: int) -> float:
    """u = 0.35 · n^1.445 / (n^1.445 + 81): the aux-loss-free bias step size (docs/design.md)."""
    power = num_experts ** 1.445
    return round(0.35 * power / (power + 81), 4)


def monte_carlo_shared_scaling(num_experts: int, top_k: int, num_shared: int,
                               router_lambda: float, draws: int = 10000, seed: int = 0) -> float:
    """λs: makes the shared expert's weight match the norm of the routed top-(k-s) weights.

    Seeded, so the same config always yields the same value (the reference draws unseeded).
    """
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((draws, num_experts - num_shared))
    z = router_lambda * (logits - logits.mean(-1, keepdims=True)) / (logits.std(-1, keepdims=True) + 1e-6)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, axis=-1)[:, -(top_k - num_shared):]
    factor = math.sqrt(num_shared) / np.linalg.norm(top, axis=-1)
    return round(float(factor.mean()), 2)


PRESETS: dict[str, dict[str, Any]] = {
    # The reference's sorting ablation (docs/design.md).
    "sort-tiny": dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, num_routed_experts=8,
                      num_experts_per_tok=3, moe_intermediate_size=256,
                      max_position_embeddings=512, router_type="conv", mlp_only_layers=[0],
                      bias_update_threshold=800),
    # make demo's model: sort-tiny narrowed (h 128) and cut to 4 layers, which learns the task
    # further than sort-tiny within the demo's minutes on 2 CPU cores (docs/training.md).
    "sort-demo": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_routed_experts=8,
                      num_experts_per_tok=3, moe_intermediate_size=128,
                      max_position_embeddings=512, router_type="conv", mlp_only_layers=[0],
                      bias_update_threshold=800),
    # A small language model for text (make demo-text): vocab_size follows the tokenizer.
    "text-tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      num_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                      max_position_embeddings=256, mlp_only_layers=[0]),
    # 83.4M parameters, for benchmarks.
    "bench": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, num_routed_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=512, max_position_embeddings=2048),
    "reference": {},
}
