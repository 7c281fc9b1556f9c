"""bfloat16 and mixed-precision policies: dtypes, accuracy, training, loading."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from tests.transformers_reference import build_reference_model, save_reference_model

CONFIG = dict(
    vocabulary_size=48,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=24,
    head_dim=8,
    layer_types=["local", "global"],
    sliding_window_size=3,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
)
INPUTS = {
    "token_ids": np.array([[2, 7, 9, 11, 13, 5]]),
    "padding_mask": np.ones((1, 6), "int32"),
}


def _model(dtype):
    lm = GemmaCausalLM(GemmaBackbone(**CONFIG, dtype=dtype))
    rng = np.random.default_rng(0)
    for variable in lm.weights:
        value = rng.normal(0, 0.3, variable.shape).astype("float32")
        variable.assign(keras.ops.cast(value, variable.dtype))
    return lm


@pytest.mark.parametrize(
    "policy, variable_dtype, compute_dtype",
    [
        ("bfloat16", "bfloat16", "bfloat16"),
        ("mixed_bfloat16", "float32", "bfloat16"),
        ("mixed_float16", "float32", "float16"),
    ],
)
def test_policies_keep_precision_critical_math_in_float32(
    policy, variable_dtype, compute_dtype
):
    reference = keras.ops.convert_to_numpy(_model("float32")(INPUTS))
    lm = _model(policy)
    backbone = lm.backbone
    assert backbone.token_embedding.embeddings.dtype == variable_dtype
    block = backbone.transformer_layers[0]
    assert block.attention.query.compute_dtype == compute_dtype
    hidden = backbone(INPUTS)
    assert keras.backend.standardize_dtype(hidden.dtype) == compute_dtype
    logits = lm(INPUTS)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    logits = keras.ops.convert_to_numpy(logits)
    assert np.isfinite(logits).all()
    # Half-precision activations, float32 norms/softmax/soft-caps: the
    # logits stay close to float32 and the greedy choices agree.
    tolerance = 0.1 * np.abs(reference).max()
    np.testing.assert_allclose(logits, reference, atol=tolerance)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16", "mixed_float16"])
def test_fit_under_policy(policy):
    lm = _model(policy)
    optimizer = keras.optimizers.Adam(0.01)
    if policy == "bfloat16":
        # Keras's Adam leaves bfloat16 variables unchanged (its moment
        # estimates underflow); plain SGD trains them.
        optimizer = keras.optimizers.SGD(0.5)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(1)
    token_ids = rng.integers(3, 48, size=(4, 9)).astype("int32")
    inputs = {"token_ids": token_ids[:, :-1], "padding_mask": np.ones((4, 8), "int32")}
    history = lm.fit(inputs, token_ids[:, 1:], batch_size=4, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_checkpoint_loads_straight_into_bfloat16(tmp_path):
    import torch

    model = build_reference_model("gemma2", sliding_window=4)
    save_reference_model(model, tmp_path, dtype=torch.bfloat16)
    backbone = GemmaBackbone.from_preset(tmp_path, dtype="bfloat16")
    embeddings = backbone.token_embedding.embeddings
    assert embeddings.dtype == "bfloat16"
    expected = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(embeddings, "float32")),
        expected.numpy(),
    )
