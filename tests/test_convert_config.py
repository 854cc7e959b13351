"""`config_from_hf`: a config.json with wrong field types is a UserError, not a traceback."""

from __future__ import annotations

from typing import Any

import pytest

from kotonoha.convert.hf import config_from_hf
from kotonoha.errors import UserError

LLAMA: dict[str, Any] = dict(
    model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, rms_norm_eps=1e-6,
)


def test_a_valid_config_imports() -> None:
    cfg = config_from_hf(LLAMA)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.positions) == (32, 4, 2, "rope")


@pytest.mark.parametrize("change", [
    {"hidden_size": "32"}, {"vocab_size": None}, {"num_key_value_heads": 0},
    {"rms_norm_eps": "tiny"}, {"max_position_embeddings": [64]},
])
def test_wrong_field_types_are_user_errors(change: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        config_from_hf({**LLAMA, **change}, where="m/config.json")


def test_gemma3_with_a_string_layer_count_is_a_user_error() -> None:
    hf = {**LLAMA, "model_type": "gemma3_text", "num_hidden_layers": "2"}
    with pytest.raises(UserError, match="m/config.json has a field of the wrong type"):
        config_from_hf(hf, where="m/config.json")
