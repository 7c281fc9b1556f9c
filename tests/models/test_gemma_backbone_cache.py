"""Prefill plus cached decoding equals running the whole sequence."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone


def _backbone(layer_types, window):
    return GemmaBackbone(
        vocabulary_size=64,
        num_layers=len(layer_types),
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=48,
        head_dim=8,
        layer_types=layer_types,
        sliding_window_size=window,
        attention_logit_soft_cap=20.0,
        use_query_key_norm=True,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        rope_max_wavelength={"global": 1e6, "local": 1e4},
        rope_scaling_factor={"global": 8.0, "local": 1.0},
    )


def _randomize(backbone):
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))


@pytest.mark.parametrize("prompt_length", [3, 6])
def test_cached_decoding_matches_full_recomputation(prompt_length):
    """Left-padded prompts; generated length exceeds the local window."""
    window, new_tokens = 4, 7
    backbone = _backbone(["local", "global", "local"], window)
    _randomize(backbone)
    rng = np.random.default_rng(1)
    total = prompt_length + new_tokens
    token_ids = rng.integers(3, 64, size=(2, total)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, :2] = 0  # the second prompt is two tokens shorter
    token_ids[padding_mask == 0] = 0

    full = keras.ops.convert_to_numpy(
        backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    )
    hidden, caches = backbone.prefill(
        token_ids[:, :prompt_length], padding_mask[:, :prompt_length], total
    )
    real = padding_mask[:, :prompt_length].astype(bool)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(hidden)[real],
        full[:, :prompt_length][real],
        atol=1e-4,
    )
    assert [cache[0].shape[1] for cache in caches] == [window, total, window]
    start_columns = np.argmax(padding_mask, axis=1).astype("int32")
    for column in range(prompt_length, total):
        hidden, caches = backbone.decode(
            token_ids[:, column : column + 1], column, start_columns, caches
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(hidden)[:, 0], full[:, column], atol=1e-4
        )
