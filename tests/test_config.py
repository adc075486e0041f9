import json
import math

import pytest

from bibo_export.config import BiBoConfig, ExecutionOptions, monte_carlo_shared_scaling


def test_reference_derivations():
    ref = BiBoConfig()
    assert ref.rope_theta == pytest.approx(160000.0, rel=1e-12)
    assert ref.moe_intermediate_size == 4104 // 6 == 684
    assert ref.mlp_only_layers == [0, 7]
    assert ref.bias_update_factor == 0.1415
    assert ref.moe_shared_scaling == pytest.approx(2.84, abs=0.03)
    assert ref.ssmax_init == pytest.approx(1 / math.log(16384))


def test_sort_tiny_derivations():
    cfg = BiBoConfig.preset("sort-tiny")
    assert cfg.rope_theta == pytest.approx(625.0, rel=1e-12)
    assert cfg.bias_update_factor == 0.0698
    assert cfg.moe_shared_scaling == pytest.approx(2.12, abs=0.03)
    assert cfg.ssmax_init == pytest.approx(1 / math.log(256))
    assert cfg.moe_intermediate_size == 256  # given explicitly, not derived
    assert cfg.mlp_only_layers == [0]


def test_monte_carlo_is_seeded_and_explicit_values_win():
    assert monte_carlo_shared_scaling(8, 3, 1, 1.0) == monte_carlo_shared_scaling(8, 3, 1, 1.0)
    assert BiBoConfig.preset("sort-tiny", moe_shared_scaling=1.0).moe_shared_scaling == 1.0


def test_bench_preset_is_about_80m_parameters():
    from bibo_export.model import BiBoForCausalLM
    params = BiBoForCausalLM(BiBoConfig.preset("bench")).num_parameters()
    assert 70e6 < params < 90e6


def test_json_round_trip_keeps_resolved_values():
    cfg = BiBoConfig.preset("sort-tiny", router_lambda=2.0)
    again = BiBoConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["rope_theta"] == cfg.rope_theta


def test_expert_capacity():
    assert ExecutionOptions(1.25).expert_capacity(100, top_k=3, num_experts=8) == \
        math.ceil(1.25 * 100 * 3 / 8)
    assert ExecutionOptions(100.0).expert_capacity(10, top_k=3, num_experts=8) == 10
    assert ExecutionOptions().expert_capacity(37, top_k=3, num_experts=8) == 37  # never drop


@pytest.mark.parametrize("options, message", [
    (dict(dispatch="loop"), "moe_dispatch"), (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=float("nan")), "capacity_factor")])
def test_invalid_execution_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        ExecutionOptions(**options)


def test_execution_options_are_not_model_config():
    """Capacity and dispatch are refused as config fields, but configs saved before they moved
    out still load, their values becoming the execution options."""
    with pytest.raises(ValueError, match="capacity_factor is an execution option"):
        BiBoConfig.preset("sort-tiny", capacity_factor=2.0)
    saved = {**BiBoConfig.preset("sort-tiny").to_dict(), "capacity_factor": 1.25,
             "moe_dispatch": "einsum"}
    config, execution = BiBoConfig.from_saved(saved)
    assert config == BiBoConfig.preset("sort-tiny")
    assert execution == ExecutionOptions(1.25, "einsum")
    assert "capacity_factor" not in config.to_dict() and "moe_dispatch" not in config.to_dict()


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=250), "hidden_size"),
    (dict(num_key_value_heads=3), "num_attention_heads"),
    (dict(num_routed_experts=3), "num_routed_experts"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok"),  # k <= s
    (dict(mlp_only_layers=[6]), "mlp_only_layers"),
    (dict(router_type="gru"), "router_type"),
    (dict(router_noise=-1.0), "router_noise"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        BiBoConfig.preset("sort-tiny", **overrides)


def test_unknown_key_and_preset():
    with pytest.raises(ValueError, match="unknown BiBoConfig key.*hiden_size"):
        BiBoConfig.from_dict({"hiden_size": 12})
    with pytest.raises(ValueError, match="unknown preset"):
        BiBoConfig.preset("huge")
    with pytest.raises(ValueError, match="not valid JSON"):
        BiBoConfig.from_json("{")
