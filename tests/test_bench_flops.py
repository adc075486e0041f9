"""The MFU that ``make bench-train`` reports rests on its count of multiplied weights; check it
against the model's own parameters, counted independently."""

import pytest
import torch

from bench.train import matmul_parameters_per_token, train_flops_per_token
from bibo_export.config import BiBoConfig
from bibo_export.model import BiBoForCausalLM
from bibo_export.model.moe import MLPExperts


@pytest.mark.parametrize("preset", ["sort-tiny", "bench"])
def test_matmul_parameters_per_token_counts_the_model(preset):
    config = BiBoConfig.preset(preset)
    with torch.device("meta"):  # shapes only
        model = BiBoForCausalLM(config)
    experts = {id(p) for m in model.modules() if isinstance(m, MLPExperts)
               for p in m.parameters()}
    expected = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or name.startswith("embed_tokens"):
            continue  # norms and SSMax scales are elementwise; the embedding is a lookup
        # A token uses k of the n routed experts; balanced, each MLP expert gets k/n of them.
        share = config.num_experts_per_tok / config.num_routed_experts \
            if id(param) in experts else 1.0
        expected += share * param.numel()
    assert matmul_parameters_per_token(config) == pytest.approx(expected, rel=1e-12)
    attention = 12 * config.num_hidden_layers * config.hidden_size * 64
    assert train_flops_per_token(config, 64) == pytest.approx(6 * expected + attention)
