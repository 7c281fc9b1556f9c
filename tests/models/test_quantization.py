"""int8 / int4 weight quantization through Keras: generate, score, reload,
and int8 on the real Gemma 3 270M."""

import gc
import warnings

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from tests.tiny_configs import tiny_causal_lm, tiny_config
from tests.tokenizer_fixtures import tiny_proto, tiny_tokenizer  # noqa: F401

PROMPTS = {
    "token_ids": np.array([[2, 7, 9, 11, 0, 0, 0, 0], [2, 5, 0, 0, 0, 0, 0, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]),
}


def _lm():
    return tiny_causal_lm(std=0.2)


def _logits(lm):
    return keras.ops.convert_to_numpy(lm(PROMPTS))


def _int8_variables(model):
    return [
        w.path
        for w in model.weights
        if keras.backend.standardize_dtype(w.dtype) == "int8"
    ]


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
    vocabulary_size = lm.backbone.vocabulary_size
    assert ((generated >= 0) & (generated < vocabulary_size)).all()
    np.testing.assert_array_equal(generated[0, :4], PROMPTS["token_ids"][0, :4])

    path = str(tmp_path / f"{mode}.keras")
    lm.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.backbone.get_config()["quantization"] == mode
    np.testing.assert_allclose(_logits(restored), quantized, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_greedy_generation_picks_what_full_forward_passes_pick(dtype):
    """The decode loop (on PyTorch: a recorded step replayed by TorchScript,
    int8 weights converted into a reused buffer or read by PyTorch's int8
    kernel) picks, at every step, the argmax of a full forward pass over
    the sequence so far."""
    lm = tiny_causal_lm(std=0.2, dtype=dtype)
    lm.quantize("int8")
    prompt, new_tokens = [2, 7, 9, 11], 6
    output = lm.generate(
        {"token_ids": np.array([prompt]), "padding_mask": np.ones((1, 4), bool)},
        max_new_tokens=new_tokens,
        stop_token_ids=None,
    )
    generated = np.asarray(keras.ops.convert_to_numpy(output["token_ids"]))[0]
    sequence = list(prompt)
    for _ in range(new_tokens):
        inputs = {
            "token_ids": np.array([sequence]),
            "padding_mask": np.ones((1, len(sequence)), bool),
        }
        logits = keras.ops.convert_to_numpy(keras.ops.cast(lm(inputs), "float32"))
        sequence.append(int(np.argmax(logits[0, -1])))
    assert generated[: len(sequence)].tolist() == sequence


def _float8_config():
    from keras.quantizers import Float8QuantizationConfig

    return Float8QuantizationConfig()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "int3"}, r"`mode`.* must be one of \['int8', 'int4'\].*'int3'"),
        # Keras knows float8, but it would quantize the projections and not
        # the tied embedding: a model whose config cannot rebuild it.
        ({"mode": "float8"}, r"`mode`.* must be one of \['int8', 'int4'\].*'float8'"),
        ({"config": "float8"}, r"mode of `config`.*'float8'"),
    ],
)
def test_unsupported_quantization_mode_is_rejected_before_any_change(kwargs, message):
    if kwargs.get("config") == "float8":
        kwargs = {"config": _float8_config()}
    lm = _lm()
    before = _logits(lm)
    with pytest.raises(ValueError, match=message):
        lm.quantize(**kwargs)
    # Nothing was half-quantized: the model is as it was and still works.
    assert _int8_variables(lm) == []
    assert not any(w.path.endswith("_scale") for w in lm.weights)
    assert lm.backbone.get_config()["quantization"] is None
    np.testing.assert_array_equal(_logits(lm), before)


def _additivity_errors(backbone):
    """How far a query projection and the output logits are from additive,
    `f(x1 + x2) == f(x1) + f(x2)`: exact (up to rounding) when only weights
    are quantized, off by the rounding of int8 activations otherwise."""
    rng = np.random.default_rng(0)
    shape = (1, 3, backbone.hidden_dim)
    x1, x2 = (rng.normal(size=shape).astype("float32") for _ in range(2))
    errors = []
    for function in (
        backbone.transformer_layers[0].attention.query,
        lambda x: backbone.token_embedding(x, reverse=True),
    ):
        together = keras.ops.convert_to_numpy(function(x1 + x2))
        apart = keras.ops.convert_to_numpy(function(x1))
        apart = apart + keras.ops.convert_to_numpy(function(x2))
        errors.append(float(np.abs(together - apart).max()))
    return errors


def test_int8_quantizes_weights_only_by_default():
    # No final soft-cap (gemma3 family): the logits are linear in the input.
    lm = _lm()
    lm.quantize("int8")
    assert max(_additivity_errors(lm.backbone)) < 1e-4
    # The layout a saved int8 model is rebuilt with does the same.
    rebuilt = GemmaBackbone(**tiny_config(), quantization="int8")
    assert max(_additivity_errors(rebuilt)) < 1e-4


def test_backbone_rejects_an_unknown_quantization_mode():
    backbone = _lm().backbone
    with pytest.raises(ValueError, match=r"`mode`.*'int3'"):
        backbone.quantize("int3")
    assert _int8_variables(backbone) == []


def _quantize_warnings(lm, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.quantize(*args, **kwargs)
    return [str(w.message) for w in caught if "quantize" in str(w.message)]


def test_quantize_skips_the_preprocessor_and_honours_filters(
    tiny_tokenizer,  # noqa: F811
):
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=8)
    lm = tiny_causal_lm(
        vocabulary_size=tiny_tokenizer.vocabulary_size(), preprocessor=preprocessor
    )
    # Keras warns for each layer it cannot quantize: the tokenizer is none
    # of the model's weights and must not be offered.
    assert _quantize_warnings(lm, "int8", filters=["^query$", "^down$"]) == []
    assert sorted(_int8_variables(lm.backbone)) == sorted(
        f"{lm.backbone.name}/decoder_block_{index}/{layer}/kernel"
        for index in range(2)
        for layer in ("attention/query", "ffw/down")
    )
    lm = tiny_causal_lm(
        vocabulary_size=tiny_tokenizer.vocabulary_size(), preprocessor=preprocessor
    )
    assert (
        _quantize_warnings(lm, "int8", filters=lambda layer: "up" == layer.name) == []
    )
    assert len(_int8_variables(lm.backbone)) == 2


def test_unsupported_quantization_argument_is_named():
    with pytest.raises(ValueError, match="`quantization`"):
        GemmaBackbone(**tiny_config(), quantization="int3")


# -- int8 on the real Gemma 3 270M ---------------------------------------------

# Prompts whose float32 greedy continuations are clear-cut: the top-2 logit
# margin stays above 1.8 for all 8 tokens. int8 moves the 270M model's
# logits by about 1-2.5 with weights only (what `quantize("int8")` does) and
# by up to about 3-6 when activations are quantized too; on open-ended
# prompts, whose margins drop below 0.3, the greedy text can change within
# 8 tokens.
REAL_PROMPTS = ["1, 2, 3, 4, 5, 6,", "one, two, three, four,", "A, B, C, D, E, F,"]
REAL_CONTINUATIONS = [" 7, 8, 9", " five, six, seven, eight,", " G, H, I, J,"]
REAL_NEW_TOKENS = 8


def _greedy(lm, prompt_ids):
    """Greedy ids (batched dict) and text (batched strings) of `lm`; both
    calls share one compiled program (same shapes and sampler)."""
    output = lm.generate(
        prompt_ids, max_new_tokens=REAL_NEW_TOKENS, stop_token_ids=None
    )
    texts = lm.generate(
        REAL_PROMPTS,
        max_new_tokens=REAL_NEW_TOKENS,
        stop_token_ids=None,
        strip_prompt=True,
    )
    return output["token_ids"], output["padding_mask"], texts


@pytest.fixture(scope="module")
def real_int8_generations():
    """Greedy outputs of the 270M model before and after `quantize("int8")`.

    One model per module (float32, about 1 GB; the int8 copy is added on
    quantizing), dropped once the outputs are taken.
    """
    lm = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    prompt_ids = lm.preprocessor.generate_preprocess(REAL_PROMPTS, sequence_length=12)
    first_logits = keras.ops.convert_to_numpy(lm(prompt_ids))
    float32 = _greedy(lm, prompt_ids)
    # Keras runs `gc.collect()` each time quantizing drops a float kernel;
    # with this process's many live objects that is most of the time spent
    # (about 10x). Freezing the objects that exist now skips them in those
    # collections; the dropped kernels are freed by reference counting.
    gc.freeze()
    try:
        quantize_warnings = _quantize_warnings(lm, "int8")
    finally:
        gc.unfreeze()
    results = {
        "quantize_warnings": quantize_warnings,
        "prompt_ids": prompt_ids,
        "float32": float32,
        "int8": _greedy(lm, prompt_ids),
        "first_logits": (first_logits, keras.ops.convert_to_numpy(lm(prompt_ids))),
        "int8_variables": _int8_variables(lm.backbone),
        "quantization": lm.backbone.get_config()["quantization"],
        "num_projections": 7 * lm.backbone.num_layers,
    }
    del lm
    gc.collect()
    return results


@pytest.mark.slow
def test_real_model_int8_keeps_greedy_output(real_int8_generations):
    results = real_int8_generations
    # The quantization took effect: every projection and the embedding
    # table hold int8 weights, and the logits moved.
    assert results["quantization"] == "int8"
    assert results["quantize_warnings"] == []
    int8 = results["int8_variables"]
    assert sum(path.endswith("/token_embedding/embeddings") for path in int8) == 1
    assert sum(path.endswith("/kernel") for path in int8) == results["num_projections"]
    before, after = results["first_logits"]
    real = np.asarray(results["prompt_ids"]["padding_mask"], bool)
    assert np.isfinite(after).all()
    assert np.abs(after - before)[real].max() > 0

    float_ids, float_mask, float_texts = results["float32"]
    int8_ids, int8_mask, int8_texts = results["int8"]
    # The premise: float32 continues each sequence as expected.
    assert float_texts == REAL_CONTINUATIONS
    lengths = real.sum(axis=1)
    np.testing.assert_array_equal(float_mask.sum(axis=1), lengths + REAL_NEW_TOKENS)
    np.testing.assert_array_equal(int8_mask, float_mask)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(
            int8_ids[row, length : length + REAL_NEW_TOKENS],
            float_ids[row, length : length + REAL_NEW_TOKENS],
            err_msg=f"{REAL_PROMPTS[row]!r}: float32 {float_texts[row]!r}, "
            f"int8 {int8_texts[row]!r}",
        )
    np.testing.assert_array_equal(int8_ids, float_ids)
    assert int8_texts == float_texts
