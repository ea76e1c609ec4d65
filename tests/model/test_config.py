"""Configs: a real LongLLaVA/Jamba config.json loads unchanged; bad ones are refused."""

import json
import pathlib

import pytest
from pydantic import ValidationError

from model.config import HybridLMConfig, LongLLaVAConfig

REAL = pathlib.Path(__file__).parent / "data" / "longllava_53b_config.json"


def test_real_config_loads_unchanged(tmp_path):
    """The Jamba config shipped in FreedomIntelligence/LongLLaVA (the 53B MoE layout)."""
    config = LongLLaVAConfig.from_json_file(REAL)
    assert config.attention_layers == [4, 12, 20, 28]
    assert [config.num_experts_of_layer(i) for i in range(4)] == [1, 16, 1, 16]
    assert config.dt_rank == 256 and config.d_inner == 8192 and config.head_dim == 128
    # unknown fields survive a save, so nothing another tool reads is lost
    config.to_json_file(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(REAL.read_text())
    assert {k: v for k, v in original.items() if v is not None}.items() <= saved.items()


def test_dt_rank_auto():
    assert HybridLMConfig(hidden_size=4096).dt_rank == 256
    assert HybridLMConfig(hidden_size=100, num_attention_heads=4, num_key_value_heads=2).dt_rank == 7


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(attn_layer_offset=8), "attn_layer_offset"),
        (dict(num_key_value_heads=5), "divisible"),
        (dict(num_experts=2, num_experts_per_tok=3), "cannot exceed"),
        (dict(hidden_size=-1), "greater than 0"),
        (dict(hidden_act="gelu"), "silu"),
        (dict(num_hidden_layers=100_000), "less than or equal to 1024"),
        (dict(num_experts=5000), "less than or equal to 1024"),
    ],
)
def test_invalid_configs_are_refused(bad, message):
    with pytest.raises(ValidationError, match=message):
        HybridLMConfig(**bad)


def test_a_bad_config_file_names_each_wrong_field_on_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": -1, "num_hidden_layers": 100_000, "vision_config": {"num_hidden_layers": 0}}))
    with pytest.raises(ValueError) as caught:
        LongLLaVAConfig.from_json_file(path)
    assert str(caught.value) == (
        "hidden_size: Input should be greater than 0 (got -1); "
        "num_hidden_layers: Input should be less than or equal to 1024 (got 100000); "
        "vision_config.num_hidden_layers: Input should be greater than 0 (got 0)"
    )
