"""The BiBo Mixture-of-Experts decoder (docs/design.md)."""

from .bibo import BiBoForCausalLM, CausalLMOutput, DecoderLayer
from .checkpoint import CheckpointError
from .moe import MoE, Router, RoutingStats, Selection, update_router_bias

__all__ = ["BiBoForCausalLM", "CausalLMOutput", "CheckpointError", "DecoderLayer", "MoE",
           "Router", "RoutingStats", "Selection", "update_router_bias"]
