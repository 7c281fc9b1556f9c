"""Tiny GemmaBackbone configurations and random-weight models for the tests.

One base shape (2 layers, one local and one global, multi-query attention,
a 64-token vocabulary) and three families on top of it, mirroring what
separates the Gemma generations:

- `"gemma"`: Gemma 1, every layer global, no soft-caps or extra norms.
- `"gemma2"`: attention and final logit soft-caps, post-attention and
  post-feed-forward norms.
- `"gemma3"`: QK-norm, post norms, a RoPE base per attention type.

`tiny_config` returns a fresh dict (safe to modify), `tiny_backbone` and
`tiny_causal_lm` build models with every weight drawn at random (norm scales
included, so a wrong norm convention cannot hide behind zeros).
"""

import copy

import keras
import numpy as np

from keras_gemma import GemmaBackbone, GemmaCausalLM

BASE = dict(
    vocabulary_size=64,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=16,
    layer_types=["local", "global"],
    sliding_window_size=4,
)

FAMILIES = {
    "gemma": dict(layer_types=["global", "global"], sliding_window_size=None),
    "gemma2": dict(
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
    ),
    "gemma3": dict(
        use_query_key_norm=True,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        rope_max_wavelength={"global": 1e6, "local": 1e4},
    ),
}


def tiny_config(family="gemma3", **overrides):
    """A fresh `GemmaBackbone` config dict of `family`, with `overrides`."""
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {sorted(FAMILIES)}, got {family!r}.")
    config = copy.deepcopy(BASE)
    config.update(copy.deepcopy(FAMILIES[family]))
    config.update(overrides)
    num_layers = config["num_layers"]
    if len(config["layer_types"]) != num_layers and "layer_types" not in overrides:
        # More layers than the base: keep alternating local and global.
        pattern = config["layer_types"]
        config["layer_types"] = [pattern[i % len(pattern)] for i in range(num_layers)]
    return config


def randomize_weights(model, seed=0, std=0.3, embedding_std=None, norm_std=None):
    """Draws every weight of `model` from N(0, std), cast to its dtype, in
    the order of `model.weights`.

    `embedding_std` sets a different spread for the token embedding: a
    small one (e.g. 0.02) keeps a tied-embedding model from repeating its
    input token, so greedy generation produces varied sequences.
    `norm_std` does the same for the norm scales.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        spread = std
        if embedding_std is not None and "token_embedding" in variable.path:
            spread = embedding_std
        elif norm_std is not None and "norm" in variable.path:
            spread = norm_std
        value = rng.normal(0, spread, variable.shape).astype("float32")
        variable.assign(keras.ops.cast(value, variable.dtype))
    return model


def tiny_backbone(
    family="gemma3",
    seed=0,
    std=0.3,
    embedding_std=None,
    norm_std=None,
    dtype=None,
    **overrides,
):
    """A `GemmaBackbone` of `tiny_config(family, **overrides)` with random
    weights (see `randomize_weights`)."""
    backbone = GemmaBackbone(**tiny_config(family, **overrides), dtype=dtype)
    return randomize_weights(
        backbone, seed=seed, std=std, embedding_std=embedding_std, norm_std=norm_std
    )


def tiny_causal_lm(family="gemma3", preprocessor=None, **kwargs):
    """A `GemmaCausalLM` around `tiny_backbone(family, **kwargs)`; without a
    preprocessor unless one is given."""
    return GemmaCausalLM(tiny_backbone(family, **kwargs), preprocessor)
