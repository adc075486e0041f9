"""Import a checkpoint written by the original BiBo implementation (its ``save_pretrained``:
``config.json`` + ``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
into a bibo-export checkpoint folder.

What differs, and how it maps (``tests/fixtures/reference-bibo/README.md`` lists the facts):

* tensor names carry a ``model.`` prefix (not ``lm_head.weight``); routed experts are separate
  modules, stacked here into [E, out, in]; the router is ``mlp.gate.gate_proj`` (mlp) or
  ``mlp.gate.gate_conv`` (conv) and its selection bias ``mlp.gate.bias``; the balancing counters
  are ``mlp.tokens_processed`` (int64) and ``mlp.accumulated_tpe``; the shared expert is
  ``mlp.shared_experts_list.0``; ``ssmax_scale`` is stored as [1, H, 1, 1];
* its config says ``tie_word_embeddings: true`` yet never ties (``lm_head.weight`` is its own
  tensor), ignores ``norm_topk_prob`` (always renormalises) and reads ``moe_shared_scaling: 1.0``
  as "estimate it" (``None`` here); several keys have no function for this model.

Anything else (an unknown tensor or config key, a missing tensor, a shape that does not fit, a
setting this model does not implement) is a one-line ``ReferenceImportError`` and nothing is
written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..artifacts import CONFIG_FILE, WEIGHTS_FILE
from ..config import BiBoConfig, parse_json_object
from ..io import atomic_directory
from .bibo import BiBoForCausalLM

INDEX_FILE = "model.safetensors.index.json"
# Config keys of the original that carry no function for this model.
NO_FUNCTION_KEYS = {"architectures", "transformers_version", "dtype", "use_cache",
                    "router_temperature", "decoder_sparse_step", "num_experts",
                    "output_router_logits", "pad_token_id", "rope_parameters", "model_type",
                    "layer_norm_type", "attention_dropout"}
# ...of which these must hold a value this model implements: (key, required value, why).
REQUIRED = (("model_type", "bibo", "not a BiBo checkpoint"),
            ("layer_norm_type", "rms", "only RMSNorm is implemented"),
            ("attention_dropout", 0, "attention dropout is not implemented"))
# Flags the original reads differently: its value is ignored there, so it is here.
IGNORED_FLAGS = {"tie_word_embeddings": False, "norm_topk_prob": True}

LAYER = r"model\.layers\.(\d+)\."
# (the original's name, our name, how the tensor changes); \1 is the layer, \2 the projection.
RENAMES: list[tuple[str, str, Callable[[Tensor], Tensor] | None]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight", None),
    (LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight",
     r"layers.\1.self_attn.\2.weight", None),
    (LAYER + r"self_attn\.ssmax_scale", r"layers.\1.self_attn.ssmax_scale",
     lambda t: t.reshape(-1)),
    (LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"layers.\1.mlp.\2.weight", None),
    (LAYER + r"mlp\.gate\.(?:gate_proj|gate_conv)\.weight", r"layers.\1.mlp.router.weight", None),
    (LAYER + r"mlp\.gate\.bias", r"layers.\1.mlp.expert_bias", None),
    (LAYER + r"mlp\.tokens_processed", r"layers.\1.mlp.tokens_seen", lambda t: t.float()),
    (LAYER + r"mlp\.accumulated_tpe", r"layers.\1.mlp.expert_counts", lambda t: t.float()),
    (LAYER + r"mlp\.shared_experts_list\.0\.gate_conv\.weight",
     r"layers.\1.mlp.shared_expert.conv.weight", None),
    (LAYER + r"mlp\.shared_experts_list\.0\.(up_proj|down_proj)\.weight",
     r"layers.\1.mlp.shared_expert.\2.weight", None),
]
ROUTED_EXPERT = re.compile(LAYER + r"mlp\.routed_experts\.(\d+)\.(gate|up|down)_proj\.weight")


LAYER_INDEX = re.compile(r"layers\.(\d+)\.")  # our names, after convert_tensors


class ReferenceImportError(ValueError):
    """The source cannot be mapped onto this model; the message names what and where."""


def convert_config(values: dict[str, Any], source: Path) -> BiBoConfig:
    """The original's config as a BiBoConfig, refusing what this model does not implement."""
    for key, required, why in REQUIRED:
        if values.get(key, required) != required:
            raise ReferenceImportError(f"{source}: {key} is {values[key]!r}: {why}")
    rope = values.get("rope_parameters") or {}
    if rope.get("factor", 1.0) != 1.0:
        raise ReferenceImportError(f"{source}: rope_parameters.factor is {rope['factor']!r}: "
                                   "RoPE scaling is not implemented")
    fields = {key: value for key, value in values.items() if key not in NO_FUNCTION_KEYS}
    fields.update(IGNORED_FLAGS)
    if fields.get("moe_shared_scaling") == 1.0:
        fields["moe_shared_scaling"] = None  # the original's "estimate it"
    try:
        return BiBoConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ReferenceImportError(f"{source}: {err}") from None


def read_tensors(source: Path) -> dict[str, Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint."""
    index = source / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ReferenceImportError(f"{index} is not a safetensors index ({err})") from None
    elif (source / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise ReferenceImportError(f"{source} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(source / name)))
        except (SafetensorError, OSError) as err:
            raise ReferenceImportError(f"{source / name} is missing, corrupt or truncated "
                                       f"({str(err).splitlines()[0]})") from None
    return tensors


def convert_tensors(tensors: dict[str, Tensor], config: BiBoConfig,
                    source: Path) -> dict[str, Tensor]:
    """The original's tensors under our names and layouts; refuses unknown names."""
    state: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for name, tensor in tensors.items():
        if config.use_ssmax is False and name.endswith("self_attn.ssmax_scale"):
            continue  # stored by the original even when SSMax is off; it has no function
        found = ROUTED_EXPERT.fullmatch(name)
        if found:
            layer, index, projection = found.groups()
            experts.setdefault((layer, projection), {})[int(index)] = tensor
            continue
        for pattern, target, change in RENAMES:
            matched = re.fullmatch(pattern, name)
            if matched:
                state[matched.expand(target)] = change(tensor) if change else tensor
                break
        else:
            raise ReferenceImportError(f"{source}: unknown tensor {name} (shape "
                                       f"{tuple(tensor.shape)}): cannot map it")
    for (layer, projection), by_index in experts.items():
        expected = range(config.num_mlp_experts)
        if sorted(by_index) != list(expected):
            raise ReferenceImportError(
                f"{source}: layer {layer} has {projection}_proj for routed experts "
                f"{sorted(by_index)}, the config needs 0..{config.num_mlp_experts - 1}")
        state[f"layers.{layer}.mlp.experts.{projection}_proj"] = torch.stack(
            [by_index[e] for e in expected])
    return state


def check_layer_count(state: dict[str, Tensor], config: BiBoConfig, config_path: Path) -> None:
    held = {int(found.group(1)) for name in state if (found := LAYER_INDEX.match(name))}
    if len(held) != config.num_hidden_layers or held != set(range(len(held))):
        raise ReferenceImportError(f"{config_path} gives num_hidden_layers="
                                   f"{config.num_hidden_layers} but the weights hold layers "
                                   f"{describe_range(held)}")


def describe_range(indices: set[int]) -> str:
    if not indices:
        return "none"
    return f"0..{max(indices)}" if indices == set(range(max(indices) + 1)) else \
        str(sorted(indices)[:8])


def check_against_model(state: dict[str, Tensor], model: BiBoForCausalLM, source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ReferenceImportError(f"{source}: no tensor for {missing[0]}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, tensor in state.items():
        if name not in expected:
            raise ReferenceImportError(f"{source}: {name} has no place in a model of this config")
        if tensor.shape != expected[name].shape:
            raise ReferenceImportError(f"{source}: {name} has shape {tuple(tensor.shape)}, the "
                                       f"config needs {tuple(expected[name].shape)}")


def import_reference(source: str | Path, out: str | Path) -> BiBoForCausalLM:
    """Convert the original BiBo checkpoint ``source`` into the checkpoint folder ``out``,
    written whole or not at all. Returns the imported model."""
    source = Path(source)
    config_path = source / CONFIG_FILE
    if not config_path.is_file():
        raise ReferenceImportError(f"{source} is not a checkpoint: it has no {CONFIG_FILE}")
    try:
        values = parse_json_object(config_path.read_text())
    except ValueError as err:
        raise ReferenceImportError(f"{config_path}: {err}") from None
    config = convert_config(values, config_path)
    state = convert_tensors(read_tensors(source), config, source)
    check_layer_count(state, config, config_path)  # before building a model of that many
    with torch.device("meta"):  # shapes only: the weights come from the source
        model = BiBoForCausalLM(config)
    check_against_model(state, model, source)
    model.load_state_dict(state, assign=True)
    with atomic_directory(out) as folder:
        model.save_pretrained(folder)
    return model
