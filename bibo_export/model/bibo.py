"""BiBoForCausalLM: embedding → decoder layers → final RMSNorm → LM head (docs/design.md).

Cached decoding: ``cache = model.new_cache(batch, max_len)`` then
``out = model(ids, cache=cache, start_pos=p)`` runs ``ids`` at absolute positions p … p+T-1 and
returns ``out.cache``, the updated cache (the input cache is not modified). The cache is a list,
one dict per layer, of static-size tensors: ``key``/``value`` [B, G, max_len, d] and, in MoE
layers, ``shared_conv`` (and ``router_conv`` for the conv router) [B, K-1, h]: the last K-1
inputs of the causal convolutions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import BiBoConfig, ExecutionOptions
from ..resources import check_model_fits
from .attention import Attention, AttentionInputs, TokenPositions
from .checkpoint import load_checkpoint, save_checkpoint
from .layers import RMSNorm, SwiGLU
from .moe import MLPExperts, MoE, RoutingStats

IGNORE_INDEX = -100
LayerCache = dict[str, Tensor]


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, T, V] fp32
    loss: Tensor | None
    routing: list[RoutingStats]  # one per MoE layer, in layer order
    cache: list[LayerCache] | None


# A pytree node (as Hugging Face registers its model outputs), so that torch.export and
# torch.compile take the model as users hold it: ``torch.export.export(model, (ids,))``.
pytree.register_pytree_node(
    CausalLMOutput, lambda out: ([getattr(out, f.name) for f in fields(out)], None),
    lambda children, _: CausalLMOutput(*children),
    serialized_type_name="bibo_export.CausalLMOutput")


class DecoderLayer(nn.Module):
    """Pre-norm: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN a MoE or a dense SwiGLU."""

    def __init__(self, config: BiBoConfig, layer_idx: int,
                 execution: ExecutionOptions | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config, execution) if self.is_moe else SwiGLU(config.hidden_size,
                                                                       config.intermediate_size)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache: LayerCache | None
                ) -> tuple[Tensor, RoutingStats | None, LayerCache]:
        attn, new_cache = self.self_attn(self.input_layernorm(x), inputs, cache)
        x = x + attn
        u = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(u), None, new_cache
        ffn, stats, conv_cache = self.mlp(u, cache, inputs.positions.is_token())
        return x + ffn, stats, {**new_cache, **conv_cache}


class BiBoForCausalLM(nn.Module):
    """``execution`` (capacity, dispatch) decides how MoE layers compute during training; the
    default never drops an assignment. ``set_execution`` changes it later."""

    def __init__(self, config: BiBoConfig, execution: ExecutionOptions | None = None) -> None:
        super().__init__()
        check_model_fits(config)  # a size typo is one line here, not an allocator's traceback
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, execution)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Linear, Embedding and the stacked expert matrices: N(0, std). Conv1d keeps PyTorch's
        # default init, norms start at 1, SSMax scales at s0, router biases at 0 (set in place).
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MLPExperts):
            for weight in module.parameters():
                nn.init.normal_(weight, std=std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def set_execution(self, execution: ExecutionOptions) -> BiBoForCausalLM:
        for module in self.modules():
            if isinstance(module, MLPExperts):
                module.execution = execution
        return self

    def inference_copy(self) -> BiBoForCausalLM:
        """Same weights, eval mode, no capacity drops: what every export computes, and so the
        reference parity compares with (a token's output never depends on its batch)."""
        return copy.deepcopy(self).eval().set_execution(ExecutionOptions())

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                cache: list[LayerCache] | None = None, start_pos: Tensor | int = 0,
                pad: Tensor | None = None) -> CausalLMOutput:
        """Logits for ``input_ids`` [B, T]; with ``labels`` [B, T] also the mean cross-entropy.

        ``labels[b, t]`` is the target for position t (already shifted, as the data pipeline
        builds them: labels = sample[1:] for input = sample[:-1]); -100 is ignored. ``pad`` [B]
        counts each row's left-padding tokens in a batch of prompts of different lengths: each
        row then computes what its prompt computes alone (``TokenPositions``).
        """
        slots = torch.arange(input_ids.shape[1], device=input_ids.device) + start_pos
        x = self.embed_tokens(input_ids)
        key_slots = None if cache is None else torch.arange(cache[0]["key"].shape[2],
                                                            device=x.device)
        inputs = AttentionInputs.of(TokenPositions(slots, pad), self.config, key_slots, x.dtype)
        routing, new_cache = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if self.gradient_checkpointing and self.training:
                # Statistics are returned, not accumulated, so the recomputation in backward
                # cannot count tokens twice.
                x, stats, layer_cache = checkpoint(layer, x, inputs, layer_cache,
                                                   use_reentrant=False)
            else:
                x, stats, layer_cache = layer(x, inputs, layer_cache)
            new_cache.append(layer_cache)
            if stats is not None:
                routing.append(stats)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits, loss, routing, None if cache is None else new_cache)

    def new_cache(self, batch_size: int, max_length: int,
                  dtype: torch.dtype = torch.float32) -> list[LayerCache]:
        """An empty static cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
        config = self.config
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        device = self.embed_tokens.weight.device
        kv_shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        conv_shape = (batch_size, config.kernel_size - 1, config.hidden_size)
        caches = []
        for layer in self.layers:
            entry = {"key": torch.zeros(kv_shape, dtype=dtype, device=device),
                     "value": torch.zeros(kv_shape, dtype=dtype, device=device)}
            if layer.is_moe:
                entry["shared_conv"] = torch.zeros(conv_shape, dtype=dtype, device=device)
                if config.router_type == "conv":
                    entry["router_conv"] = torch.zeros(conv_shape, dtype=dtype, device=device)
            caches.append(entry)
        return caches

    def apply_routing_stats(self, routing: list[RoutingStats]) -> None:
        """The train step's bias update: fold a training forward's statistics into each MoE
        layer's counters. Does nothing in eval mode: evaluation never moves the biases."""
        if not self.training:
            return
        for moe, stats in zip(self.moe_layers, routing, strict=True):
            moe.apply_routing_stats(stats)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Checkpoint I/O lives in checkpoint.py; these are the familiar entry points.
    def save_pretrained(self, directory: str) -> None:
        save_checkpoint(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> BiBoForCausalLM:
        return load_checkpoint(cls, directory, map_location)
