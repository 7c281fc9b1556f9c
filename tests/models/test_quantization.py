"""int8 / int4 weight quantization through Keras: generate, score, reload."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM

CONFIG = dict(
    vocabulary_size=64,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=16,
    layer_types=["local", "global"],
    sliding_window_size=4,
    use_query_key_norm=True,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
)
PROMPTS = {
    "token_ids": np.array([[2, 7, 9, 11, 0, 0, 0, 0], [2, 5, 0, 0, 0, 0, 0, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]),
}


def _lm():
    lm = GemmaCausalLM(GemmaBackbone(**CONFIG))
    rng = np.random.default_rng(0)
    for variable in lm.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    return lm


def _logits(lm):
    return keras.ops.convert_to_numpy(lm(PROMPTS))


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.1), ("int4", 0.3)])
def test_quantized_model_scores_generates_and_reloads(mode, tolerance, tmp_path):
    lm = _lm()
    reference = _logits(lm)
    lm.quantize(mode)
    kernel = lm.backbone.transformer_layers[0].attention.query._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    quantized = _logits(lm)
    real = PROMPTS["padding_mask"].astype(bool)
    error = np.abs(quantized - reference)[real].max()
    assert 0 < error < tolerance * np.abs(reference).max()

    scores = keras.ops.convert_to_numpy(
        lm.score(PROMPTS["token_ids"], PROMPTS["padding_mask"])
    )
    np.testing.assert_allclose(scores[real], quantized[real], atol=1e-4)
    output = lm.generate(PROMPTS, max_new_tokens=4, stop_token_ids=None)
    generated = np.asarray(keras.ops.convert_to_numpy(output["token_ids"]))
    mask = np.asarray(keras.ops.convert_to_numpy(output["padding_mask"]))
    assert mask.sum(axis=1).tolist() == [8, 6]
    assert ((generated >= 0) & (generated < 64)).all()
    np.testing.assert_array_equal(generated[0, :4], PROMPTS["token_ids"][0, :4])

    path = str(tmp_path / f"{mode}.keras")
    lm.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.backbone.get_config()["quantization"] == mode
    np.testing.assert_allclose(_logits(restored), quantized, atol=1e-5)


def test_unsupported_quantization_mode_is_rejected():
    with pytest.raises(ValueError, match="int3"):
        _lm().quantize("int3")
