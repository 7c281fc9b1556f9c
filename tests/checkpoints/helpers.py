"""Small shared pieces of the checkpoint tests: a tiny Gemma vocabulary,
random backbones, and logits of a model or transformers reference."""

import functools

import keras
import numpy as np

from keras_gemma import GemmaBackbone, GemmaCausalLM


@functools.lru_cache(maxsize=1)
def tiny_proto():
    """A tiny Gemma-like SentencePiece model (serialized), trained once."""
    from tests.tokenizer_fixtures import train_sentencepiece

    return train_sentencepiece()


def tiny_tokenizer():
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    return GemmaTokenizer(proto=tiny_proto())


def tiny_vocabulary_size():
    return tiny_tokenizer().vocabulary_size()


def random_backbone(seed=0, dtype=None, **overrides):
    """A small backbone of Gemma 2 style (windows, soft-caps, post-norms)
    with every weight random (norm scales included)."""
    config = dict(
        vocabulary_size=tiny_vocabulary_size(),
        num_layers=3,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=48,
        head_dim=8,
        layer_types=["local", "global", "local"],
        sliding_window_size=4,
        attention_logit_soft_cap=20.0,
        final_logit_soft_cap=15.0,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
    )
    config.update(overrides)
    backbone = GemmaBackbone(**config, dtype=dtype)
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        value = rng.normal(size=variable.shape) * 0.3
        variable.assign(value.astype("float32"))
    return backbone


def tiny_causal_lm(seed=0, sequence_length=24, instruction_tuned=False, **overrides):
    from keras_gemma.models.gemma_causal_lm_preprocessor import (
        GemmaCausalLMPreprocessor,
    )

    preprocessor = GemmaCausalLMPreprocessor(
        tiny_tokenizer(), sequence_length=sequence_length
    )
    return GemmaCausalLM(
        random_backbone(seed, **overrides),
        preprocessor,
        instruction_tuned=instruction_tuned,
    )


def batch(vocabulary_size, length=9, seed=1):
    """Token ids and a padding mask with one right-padded row."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(3, vocabulary_size, size=(2, length))
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, length - 3 :] = 0
    token_ids[padding_mask == 0] = 0
    return token_ids, padding_mask


def logits(model, token_ids, padding_mask):
    """Float32 logits of a GemmaCausalLM or GemmaBackbone."""
    if isinstance(model, GemmaBackbone):
        model = GemmaCausalLM(model)
    output = model({"token_ids": token_ids, "padding_mask": padding_mask})
    return np.asarray(keras.ops.convert_to_numpy(output), np.float32)


def assert_close(reference, ours, padding_mask, atol=1e-4):
    real = np.asarray(padding_mask).astype(bool)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours[real], reference[real], atol=atol, rtol=0)
