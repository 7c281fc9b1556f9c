"""bfloat16 and mixed-precision policies: dtypes, accuracy, generation,
training, loading."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone
from tests.tiny_configs import tiny_causal_lm, tiny_config
from tests.transformers_reference import build_reference_model, save_reference_model

# Gemma 2 style: the soft-caps and post-norms are the precision-critical
# parts that must stay in float32.
FAMILY = "gemma2"
INPUTS = {
    "token_ids": np.array([[2, 7, 9, 11, 13, 5]]),
    "padding_mask": np.ones((1, 6), "int32"),
}
# policy: (variable dtype, compute dtype)
POLICIES = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_bfloat16": ("float32", "bfloat16"),
    "mixed_float16": ("float32", "float16"),
}


def _model(dtype):
    return tiny_causal_lm(FAMILY, dtype=dtype)


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


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
    reference = _numpy(_model("float32")(INPUTS))
    lm = _model(policy)
    backbone = lm.backbone
    assert backbone.token_embedding.embeddings.dtype == variable_dtype
    block = backbone.transformer_layers[0]
    assert block.attention.query.compute_dtype == compute_dtype
    hidden = backbone(INPUTS)
    assert keras.backend.standardize_dtype(hidden.dtype) == compute_dtype
    logits = lm(INPUTS)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    logits = _numpy(logits)
    assert np.isfinite(logits).all()
    # Half-precision activations, float32 norms/softmax/soft-caps: the
    # logits stay close to float32 and the greedy choices agree.
    tolerance = 0.1 * np.abs(reference).max()
    np.testing.assert_allclose(logits, reference, atol=tolerance)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.8


# -- generation under each policy ---------------------------------------------

# Right-padded prompts of unequal lengths; weights whose greedy continuations
# vary (a small embedding spread keeps the tied model from repeating itself).
GENERATION_PROMPTS = {
    "token_ids": np.array([[2, 7, 9, 11, 13, 5], [2, 40, 17, 0, 0, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool),
}
NEW_TOKENS = 8
GENERATION_WEIGHTS = dict(seed=2, embedding_std=0.15)
# Largest logit error allowed, as a fraction of the largest float32 logit:
# about twice what each backend gives (bfloat16 keeps 8 bits of mantissa,
# about 1.0-1.3% here; float16 11 bits, about 0.19%).
LOGIT_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.02, "float16": 0.004}
# Every row must be decided clearly (float32 top-2 margin above twice the
# tolerance) for at least this many steps, or the comparison proves little.
MIN_DECIDED_STEPS = 4


def _generation_model(dtype):
    return tiny_causal_lm(FAMILY, dtype=dtype, **GENERATION_WEIGHTS)


def _step_logits(lm, token_ids, prompt_lengths):
    """Float32 logits each generated token was chosen from, teacher-forced
    along `token_ids` (prompt and continuation, no padding inside)."""
    mask = np.zeros(token_ids.shape, bool)
    for row, length in enumerate(prompt_lengths):
        mask[row, : length + NEW_TOKENS] = True
    logits = _numpy(lm({"token_ids": token_ids, "padding_mask": mask}))
    return np.stack(
        [
            logits[row, length - 1 : length - 1 + NEW_TOKENS]
            for row, length in enumerate(prompt_lengths)
        ]
    )


@pytest.fixture(scope="module")
def float32_generation():
    """`(output ids, per-step logits)` of the float32 model."""
    lm = _generation_model("float32")
    output = lm.generate(
        GENERATION_PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=None
    )
    lengths = GENERATION_PROMPTS["padding_mask"].sum(axis=1)
    return output["token_ids"], _step_logits(lm, output["token_ids"], lengths)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_generate_under_policy(policy, float32_generation):
    variable_dtype, compute_dtype = POLICIES[policy]
    keras.config.set_dtype_policy(policy)  # the conftest fixture restores it
    lm = _generation_model(None)
    backbone = lm.backbone
    assert backbone.dtype_policy.name == policy
    assert backbone.token_embedding.embeddings.dtype == variable_dtype

    # The decode step: caches and hidden states in the compute dtype (a
    # float32 cache would double its memory), logits in float32.
    prompt = GENERATION_PROMPTS["token_ids"][:1]
    _, caches = backbone.prefill(prompt, np.ones_like(prompt), prompt.shape[1] + 2)
    hidden, caches = backbone.decode(
        np.array([[5]]), prompt.shape[1], np.zeros((1,), "int32"), caches
    )
    cache_dtypes = {keras.backend.standardize_dtype(t.dtype) for c in caches for t in c}
    assert cache_dtypes == {compute_dtype}
    assert keras.backend.standardize_dtype(hidden.dtype) == compute_dtype
    logits = backbone.token_embedding(hidden, reverse=True)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"

    output = lm.generate(
        GENERATION_PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=None
    )
    token_ids, mask = output["token_ids"], output["padding_mask"]
    lengths = GENERATION_PROMPTS["padding_mask"].sum(axis=1)
    assert mask.sum(axis=1).tolist() == (lengths + NEW_TOKENS).tolist()
    assert ((token_ids >= 0) & (token_ids < backbone.vocabulary_size)).all()
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(
            token_ids[row, :length], GENERATION_PROMPTS["token_ids"][row, :length]
        )

    reference_ids, reference_logits = float32_generation
    scale = np.abs(reference_logits).max()
    tolerance = LOGIT_TOLERANCE[compute_dtype] * scale
    # Teacher-forced along the float32 continuation, every step's logits
    # (the first one included) stay close to float32's.
    logits = _step_logits(lm, reference_ids, lengths)
    np.testing.assert_allclose(logits, reference_logits, atol=tolerance, rtol=0)
    # The greedy ids equal float32's wherever float32's choice is clear: up
    # to the first step whose top-2 margin is within reach of the error.
    ordered = np.sort(reference_logits, axis=-1)
    margins = ordered[..., -1] - ordered[..., -2]
    for row, length in enumerate(lengths):
        unclear = np.flatnonzero(margins[row] <= 2 * tolerance)
        decided = int(unclear[0]) if unclear.size else NEW_TOKENS
        assert decided >= MIN_DECIDED_STEPS, (policy, row, margins[row])
        np.testing.assert_array_equal(
            token_ids[row, length : length + decided],
            reference_ids[row, length : length + decided],
            err_msg=f"{policy}, row {row}",
        )


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
    vocabulary_size = tiny_config(FAMILY)["vocabulary_size"]
    token_ids = rng.integers(3, vocabulary_size, size=(4, 9)).astype("int32")
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
