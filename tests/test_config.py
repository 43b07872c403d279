"""config.json -> EncoderConfig: the real field set maps exactly; what we lack is rejected."""

import json

import pytest

from pipeline.model import EncoderConfig, UnsupportedConfigError, config_from_hub, hub_config_dict
from pipeline.model.config import KNOWN_HUB_FIELDS


def real_hub_config() -> dict:
    return hub_config_dict(EncoderConfig(), name="nomic-ai/nomic-xlm-2048")


def test_real_config_maps_to_real_sizes():
    cfg = config_from_hub(real_hub_config())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (250048, 768, 12, 12)
    assert (cfg.ffn_size, cfg.num_experts, cfg.top_k, cfg.head_dim) == (3072, 8, 2, 64)
    assert cfg.moe_layers == (1, 3, 5, 7, 9, 11)
    assert cfg.layer_norm_eps == 1e-5 and cfg.rotary_base == 10000.0


def test_fixture_config_has_the_real_field_set(parity_fixture_dir):
    hub = json.loads((parity_fixture_dir / "config.json").read_text())
    assert len(hub) == 62  # the real config.json's key count (model-spec section 1)
    assert set(hub) == set(real_hub_config())
    assert set(hub) <= KNOWN_HUB_FIELDS
    cfg = config_from_hub(hub)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.num_experts) == (64, 4, 4, 4)
    assert cfg.moe_layers == (1, 3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prenorm", True),
        ("rotary_emb_interleaved", True),
        ("rotary_scaling_factor", 2.0),
        ("rotary_emb_scale_base", 512),
        ("rotary_emb_fraction", 0.5),
        ("moe_normalize_expert_weights", True),
        ("activation_function", "gelu_new"),
        ("num_shared_experts", 1),
        ("causal", True),
        ("use_rms_norm", True),
        ("qkv_proj_bias", False),
        ("expert_choice_router", True),
        ("model_type", "bert"),
    ],
)
def test_unsupported_value_is_rejected_naming_field_and_value(field, value):
    hub = real_hub_config() | {field: value}
    with pytest.raises(UnsupportedConfigError, match=rf"{field}.*{value!r}"):
        config_from_hub(hub)


def test_unknown_field_is_rejected():
    with pytest.raises(UnsupportedConfigError, match="brand_new_switch"):
        config_from_hub(real_hub_config() | {"brand_new_switch": 1})


def test_dense_v1_config_is_rejected():
    hub = real_hub_config()
    del hub["num_experts"], hub["moe_every_n_layers"], hub["moe_top_k"]
    with pytest.raises(UnsupportedConfigError, match="no MoE"):
        config_from_hub(hub)


def test_shape_errors_are_reported():
    with pytest.raises(UnsupportedConfigError, match="divisible"):
        config_from_hub(real_hub_config() | {"n_head": 5})
    with pytest.raises(UnsupportedConfigError, match="top_k"):
        config_from_hub(real_hub_config() | {"moe_top_k": 9})


def test_round_trip():
    cfg = EncoderConfig(hidden_size=96, num_heads=3, num_layers=3, num_experts=5, top_k=3,
                        ffn_size=40, vocab_size=128)
    assert config_from_hub(hub_config_dict(cfg)) == cfg
