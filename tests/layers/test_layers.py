"""Each layer against a direct numpy statement of its math."""

import math
import re

import keras
import numpy as np
import pytest

from keras_gemma import (
    GeGLUFeedForward,
    GemmaAttention,
    GemmaRMSNormalization,
    RotaryEmbedding,
    TiedTokenEmbedding,
)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_rms_normalization_uses_one_plus_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    scale = rng.normal(size=(8,)).astype("float32")
    layer = GemmaRMSNormalization(epsilon=1e-6)
    layer.build(x.shape)
    layer.scale.assign(scale)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    expected = expected * (1 + scale)
    np.testing.assert_allclose(_numpy(layer(x)), expected, atol=1e-5)


def test_rms_normalization_computes_in_float32_under_bfloat16():
    x = np.full((1, 4), 300.0, dtype="float32")
    layer = GemmaRMSNormalization(dtype="bfloat16")
    y = layer(keras.ops.cast(x, "bfloat16"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    np.testing.assert_allclose(_numpy(keras.ops.cast(y, "float32")), 1.0)


def test_rms_normalization_rounds_its_float32_result_once_under_bfloat16():
    rng = np.random.default_rng(2)
    x = keras.ops.cast(rng.normal(size=(3, 64)) * 4, "bfloat16")
    scale = rng.normal(size=(64,)).astype("float32") * 0.1
    layer = GemmaRMSNormalization(epsilon=1e-6, dtype="bfloat16")
    layer.build(x.shape)
    layer.scale.assign(scale)
    exact = _numpy(keras.ops.cast(x, "float32")).astype("float64")
    exact = exact / np.sqrt(np.mean(exact**2, axis=-1, keepdims=True) + 1e-6)
    exact = exact * (1 + _numpy(keras.ops.cast(layer.scale, "float32")))
    rounded = _numpy(keras.ops.cast(keras.ops.cast(exact, "bfloat16"), "float32"))
    y = _numpy(keras.ops.cast(layer(x), "float32"))
    # Equal to the exact result rounded to bfloat16, but for ties at the
    # last bit.
    assert np.mean(y == rounded) > 0.99
    np.testing.assert_allclose(y, rounded, rtol=2**-8)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's kernel")
def test_rms_normalization_gradient_on_torch_is_the_formulas():
    import torch

    rng = np.random.default_rng(3)
    layer = GemmaRMSNormalization(epsilon=1e-6)
    layer.build((2, 16))
    layer.scale.assign(rng.normal(size=(16,)).astype("float32"))
    x = torch.tensor(rng.normal(size=(2, 16)), dtype=torch.float32)
    upstream = torch.tensor(rng.normal(size=(2, 16)), dtype=torch.float32)
    gradients = []
    for normalize in (
        layer,
        lambda t: (
            t
            * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
            * (1 + layer.scale.value)
        ),
    ):
        leaf = x.clone().requires_grad_(True)
        (normalize(leaf) * upstream).sum().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling_factor", [1.0, 8.0])
def test_rotary_embedding_half_split(scaling_factor):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    positions = np.array([[0, 1, 2, 3, 4], [0, 0, 1, 2, 9]])
    layer = RotaryEmbedding(max_wavelength=100.0, scaling_factor=scaling_factor)
    inverse_frequency = 1 / 100.0 ** (np.arange(0, 8, 2) / 8) / scaling_factor
    angles = positions[..., None, None] * inverse_frequency
    x1, x2 = x[..., :4], x[..., 4:]
    cos, sin = np.cos(angles), np.sin(angles)
    expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    np.testing.assert_allclose(
        _numpy(layer(x, positions=positions)), expected, atol=1e-5
    )


def test_rotary_embedding_rejects_non_positive_settings():
    with pytest.raises(ValueError, match="max_wavelength"):
        RotaryEmbedding(max_wavelength=0)
    with pytest.raises(ValueError, match="scaling_factor"):
        RotaryEmbedding(scaling_factor=-1)


def test_tied_embedding_scales_and_soft_caps():
    layer = TiedTokenEmbedding(input_dim=7, output_dim=4, logit_soft_cap=2.0)
    layer.build((None, None))
    table = np.random.default_rng(2).normal(size=(7, 4)).astype("float32") * 3
    layer.embeddings.assign(table)
    np.testing.assert_allclose(
        _numpy(layer(np.array([[3, 5]]))), table[[3, 5]][None] * 2.0, atol=1e-6
    )
    hidden = np.random.default_rng(3).normal(size=(1, 2, 4)).astype("float32")
    expected = 2.0 * np.tanh(hidden @ table.T / 2.0)
    logits = _numpy(layer(hidden, reverse=True))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.abs(logits).max() < 2.0


def test_geglu_feedforward():
    rng = np.random.default_rng(4)
    layer = GeGLUFeedForward(hidden_dim=6, intermediate_dim=10)
    layer.build((None, None, 6))
    gate, up, down = (
        rng.normal(size=v.shape).astype("float32")
        for v in (layer.gate.kernel, layer.up.kernel, layer.down.kernel)
    )
    layer.gate.kernel.assign(gate)
    layer.up.kernel.assign(up)
    layer.down.kernel.assign(down)
    x = rng.normal(size=(2, 3, 6)).astype("float32")

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    expected = (gelu_tanh(x @ gate) * (x @ up)) @ down
    np.testing.assert_allclose(_numpy(layer(x)), expected, atol=1e-4)


def _attention_reference(layer, x, positions, allowed):
    """Grouped-query attention in plain numpy, keys shared across groups."""
    q = np.einsum("btd,ndh->btnh", x, _numpy(layer.query.kernel))
    k = np.einsum("btd,kdh->btkh", x, _numpy(layer.key.kernel))
    v = np.einsum("btd,kdh->btkh", x, _numpy(layer.value.kernel))
    rope = RotaryEmbedding(layer.rope_max_wavelength)
    q, k = _numpy(rope(q, positions=positions)), _numpy(rope(k, positions=positions))
    groups = layer.num_query_heads // layer.num_key_value_heads
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(layer.query_pre_attn_scalar)
    if layer.logit_soft_cap:
        logits = layer.logit_soft_cap * np.tanh(logits / layer.logit_soft_cap)
    logits = np.where(allowed[:, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", weights, v)
    return np.einsum("btnh,nhd->btd", out, _numpy(layer.attention_output.kernel))


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_grouped_query_attention_with_window(soft_cap):
    rng = np.random.default_rng(5)
    layer = GemmaAttention(
        hidden_dim=12,
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        query_pre_attn_scalar=10,
        attention_type="local",
        sliding_window_size=2,
        logit_soft_cap=soft_cap,
    )
    layer.build((None, None, 12))
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = rng.normal(size=(1, 5, 12)).astype("float32")
    positions = np.arange(5)[None]
    columns = np.arange(5)
    allowed = (columns[None, :] <= columns[:, None]) & (
        columns[None, :] > columns[:, None] - 2
    )
    out, (keys, values) = layer(x, positions=positions, attention_mask=allowed[None])
    assert tuple(keys.shape) == (1, 5, 2, 6)
    np.testing.assert_allclose(
        _numpy(out),
        _attention_reference(layer, x, positions, allowed[None]),
        atol=1e-4,
    )


def test_bfloat16_attention_on_cpu_multiplies_in_float32():
    # Logits 100 and 100.25 are both 100 once rounded to bfloat16 (spacing
    # 0.5 there), which would weigh the two values equally. The inputs are
    # exact in bfloat16; only the products' precision is tested.
    layer = GemmaAttention(
        hidden_dim=4,
        num_query_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        query_pre_attn_scalar=1,
        dtype="bfloat16",
    )
    layer.build((None, None, 4))
    layer.attention_output.kernel.assign(np.eye(4, dtype="float32")[None])
    query = np.ones((1, 1, 1, 4), "float32")
    keys = np.array([[[64, 32, 4, 0]], [[64, 32, 4, 0.25]]], "float32")[None]
    values = np.array([[[0, 0, 0, 0]], [[1, 1, 1, 1]]], "float32")[None]
    bfloat16 = [keras.ops.cast(x, "bfloat16") for x in (query, keys, values)]

    out = layer.attend(*bfloat16, attention_mask=np.ones((1, 1, 2), bool))

    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = 1 / (1 + math.exp(-0.25))  # 0.562, against 0.5 rounded
    np.testing.assert_allclose(
        _numpy(keras.ops.cast(out, "float32")), np.full((1, 1, 4), expected), rtol=1e-2
    )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's kernel")
def test_fused_attention_on_torch_matches_the_einsums(monkeypatch):
    """On PyTorch's CPU the attention is one fused operation: same outputs
    as the einsums, grouped heads and mask included."""
    import torch

    from keras_gemma.layers import attention

    layer = GemmaAttention(
        hidden_dim=8,
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
    )
    layer.build((None, None, 8))
    rng = np.random.default_rng(0)
    query = rng.normal(size=(2, 3, 4, 8)).astype("float32")
    keys, values = rng.normal(size=(2, 2, 5, 2, 8)).astype("float32")
    mask = rng.random((2, 3, 5)) < 0.6
    mask[..., 0] = True  # every query sees a key
    query, keys, values, mask = (
        torch.from_numpy(x) for x in (query, keys, values, mask)
    )
    fused_calls = []
    fused = attention._torch_fused_attention
    monkeypatch.setattr(
        attention,
        "_torch_fused_attention",
        lambda *args: fused_calls.append(1) or fused(*args),
    )
    with torch.no_grad():
        out = _numpy(layer.attend(query, keys, values, attention_mask=mask))
        monkeypatch.setattr(attention, "_torch_on_cpu", lambda tensor: False)
        expected = _numpy(layer.attend(query, keys, values, attention_mask=mask))
    assert fused_calls == [1]
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="inspects XLA's program")
def test_bfloat16_decode_updates_the_cache_in_place_on_jax():
    """A bfloat16 cache read in float32 is updated in place each step: XLA
    copies no whole cache in the decode loop."""
    import jax

    layer = GemmaAttention(
        hidden_dim=16,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        dtype="bfloat16",
    )
    layer.build((None, None, 16))
    cache_length = 24

    def decode(keys, values, hidden):
        def step(index, carry):
            keys, values, hidden = carry
            allowed = (keras.ops.arange(cache_length) <= index)[None, None]
            hidden, (keys, values) = layer(
                hidden,
                positions=keras.ops.reshape(index, (1, 1)),
                attention_mask=allowed,
                cache=(keys, values),
                cache_index=index,
            )
            return keys, values, hidden

        return jax.lax.fori_loop(0, cache_length, step, (keys, values, hidden))

    cache = keras.ops.zeros((1, cache_length, 1, 8), "bfloat16")
    hidden = keras.ops.ones((1, 1, 16), "bfloat16")
    text = jax.jit(decode).lower(cache, cache, hidden).compile().as_text()
    body_name = re.search(r" while\(.*?body=%?([\w.-]+)", text).group(1)
    body = text[re.search(rf"^%?{re.escape(body_name)} ", text, re.M).start() :]
    body = body[: body.index("\n}")]
    assert re.search(rf"= bf16\[1,{cache_length},1,8\]\S* fusion\(", body)
    assert not re.search(rf"= bf16\[1,{cache_length},1,8\]\S* copy\(", body)
    keys, values, _ = decode(cache, cache, hidden)
    assert np.all(_numpy(keras.ops.cast(keys, "float32")) != 0)


def test_attention_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GemmaAttention(
            8,
            num_query_heads=3,
            num_key_value_heads=2,
            head_dim=4,
            query_pre_attn_scalar=4,
        )
    with pytest.raises(ValueError, match="attention_type"):
        GemmaAttention(8, 2, 1, 4, 4, attention_type="sliding")
    with pytest.raises(ValueError, match="sliding_window_size"):
        GemmaAttention(8, 2, 1, 4, 4, attention_type="local")


@pytest.mark.parametrize(
    "layer",
    [
        GemmaRMSNormalization(epsilon=1e-5),
        RotaryEmbedding(max_wavelength=1e6, scaling_factor=8.0),
        TiedTokenEmbedding(input_dim=9, output_dim=4, logit_soft_cap=30.0),
        GeGLUFeedForward(hidden_dim=4, intermediate_dim=8),
        GemmaAttention(
            8,
            2,
            1,
            4,
            4,
            attention_type="local",
            sliding_window_size=3,
            logit_soft_cap=50.0,
            use_query_key_norm=True,
        ),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    restored = type(layer).from_config(config)
    assert restored.get_config() == config


@pytest.mark.parametrize("rows", [1, 3, 20])  # one, a few, and many at once
def test_tied_embedding_int8_weights_only_logits_match_keras(rows):
    """The weights-only int8 output projection is computed differently from
    Keras's `ReversibleEmbedding` (converted table, transposed): same logits."""
    from keras.quantizers import Int8QuantizationConfig

    table = np.random.default_rng(5).normal(size=(13, 4)).astype("float32")
    hidden = np.random.default_rng(6).normal(size=(2, rows, 4)).astype("float32")
    ours = TiedTokenEmbedding(input_dim=13, output_dim=4)
    reference = keras.layers.ReversibleEmbedding(13, 4, tie_weights=True)
    for layer in (ours, reference):
        layer.build((None, None))
        layer.embeddings.assign(table)
        layer.quantize("int8", config=Int8QuantizationConfig(activation_quantizer=None))
    expected = _numpy(reference(hidden, reverse=True))
    np.testing.assert_allclose(
        _numpy(ours(hidden, reverse=True)), expected, rtol=1e-5, atol=1e-5
    )
    # And close to the float logits: only the table was rounded.
    np.testing.assert_allclose(expected, hidden @ table.T, rtol=0.05, atol=0.05)
