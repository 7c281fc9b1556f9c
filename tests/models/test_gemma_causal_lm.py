"""GemmaCausalLM end to end with a tiny SentencePiece vocabulary: compile
defaults, fit / evaluate / predict on strings, text generation, streaming,
stop tokens, scoring, and argument checking."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.generation import samplers
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from tests.tokenizer_fixtures import tiny_proto, tiny_tokenizer  # noqa: F401

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! hello World, how are you today?",
    "def foo(x):",
    "你好世界 こんにちは",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: PyTorch's intra-op threads cost more than they gain."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_lm(tokenizer, sequence_length=32, seed=2):
    """A 2-layer model with random weights whose greedy text varies (byte
    tokens, multi-byte characters) rather than repeating one token."""
    backbone = GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        layer_types=["local", "global"],
        sliding_window_size=8,
        use_query_key_norm=True,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
    )
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if "norm" in variable.path:
            std = 0.5
        elif "embedding" in variable.path:
            std = 0.02
        else:
            std = 0.2
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    return GemmaCausalLM(backbone, preprocessor)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):  # noqa: F811
    return make_lm(tiny_tokenizer)


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


# -- training -----------------------------------------------------------------


def test_compile_defaults(lm):
    assert isinstance(lm.optimizer, keras.optimizers.Adam)
    assert float(_numpy(lm.optimizer.learning_rate)) == pytest.approx(2e-5)
    assert isinstance(lm.loss, keras.losses.SparseCategoricalCrossentropy)
    assert lm.loss.get_config()["from_logits"]
    assert isinstance(lm.sampler, samplers.GreedySampler)
    other = GemmaCausalLM(lm.backbone, lm.preprocessor)
    other.compile(sampler={"name": "top_p", "p": 0.8})
    assert isinstance(other.sampler, samplers.TopPSampler) and other.sampler.p == 0.8
    other.compile(sampler=samplers.BeamSampler(num_beams=2))
    assert other.sampler.num_beams == 2
    with pytest.raises(ValueError, match="Unknown `sampler` 'nucleus'"):
        other.compile(sampler="nucleus")


def test_fit_evaluate_predict_on_strings(tiny_tokenizer):  # noqa: F811
    import tensorflow as tf

    lm = make_lm(tiny_tokenizer, sequence_length=16)
    lm.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2))
    before = _numpy(lm.backbone.token_embedding.embeddings).copy()
    history = lm.fit(TEXTS, batch_size=2, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert "sparse_categorical_accuracy" in history.history
    assert losses[-1] < losses[0]
    assert not np.allclose(_numpy(lm.backbone.token_embedding.embeddings), before)

    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(2)
    history = lm.fit(dataset, epochs=1, verbose=0, validation_data=TEXTS[:2])
    assert np.isfinite(history.history["loss"][0])
    assert "val_loss" in history.history

    results = lm.evaluate(TEXTS, batch_size=2, verbose=0, return_dict=True)
    assert set(results) >= {"loss", "sparse_categorical_accuracy"}
    logits = lm.predict(TEXTS, batch_size=2, verbose=0)
    assert logits.shape == (len(TEXTS), 16, tiny_tokenizer.vocabulary_size())


# -- generation ---------------------------------------------------------------


def test_generate_text_structure_and_batching(lm):
    prompts = ["The quick brown", "Hello"]
    batch = lm.generate(prompts, max_new_tokens=20, stop_token_ids=None)
    assert isinstance(batch, list) and len(batch) == 2
    alone = [lm.generate(p, max_new_tokens=20, stop_token_ids=None) for p in prompts]
    assert all(isinstance(text, str) for text in alone)
    # Prompts of different lengths, batched, continue as they do alone.
    assert batch == alone
    assert lm.generate(tuple(prompts), max_new_tokens=20, stop_token_ids=None) == batch
    assert (
        lm.generate(np.array(prompts), max_new_tokens=20, stop_token_ids=None) == batch
    )

    # The same through ids: the text is the ids without special tokens.
    packed = lm.preprocessor.generate_preprocess(prompts, sequence_length=24)
    ids = lm.generate(packed, max_new_tokens=20, stop_token_ids=None)
    tokenizer = lm.preprocessor.tokenizer
    rows = [row[mask] for row, mask in zip(ids["token_ids"], ids["padding_mask"])]
    assert batch == tokenizer.detokenize(rows, skip_special_tokens=True)
    for prompt, text in zip(prompts, batch):
        assert text.startswith(prompt) and "<bos>" not in text

    stripped = lm.generate(
        prompts, max_new_tokens=20, stop_token_ids=None, strip_prompt=True
    )
    lengths = packed["padding_mask"].sum(axis=1)
    new = [row[length:] for row, length in zip(rows, lengths)]
    assert stripped == tokenizer.detokenize(new, skip_special_tokens=True)

    # One prompt as a rank-1 dict comes back as a rank-1 dict.
    single = lm.generate(
        {key: value[1] for key, value in packed.items()},
        max_new_tokens=20,
        stop_token_ids=None,
    )
    assert single["token_ids"].shape == (max(24, lengths[1] + 20),)
    assert single["token_ids"][single["padding_mask"]].tolist() == rows[1].tolist()


def test_max_length_defaults_to_the_sequence_length(lm):
    default = lm.generate("Hello", stop_token_ids=None)
    assert default == lm.generate("Hello", max_length=32, stop_token_ids=None)
    prompt = lm.preprocessor.generate_preprocess("Hello", sequence_length=8)
    budget = 32 - int(prompt["padding_mask"].sum())
    assert default == lm.generate("Hello", max_new_tokens=budget, stop_token_ids=None)


def test_stream_concatenates_to_generate(lm):
    prompt = "Hello"
    expected = lm.generate(
        prompt, max_new_tokens=24, stop_token_ids=None, strip_prompt=True
    )
    traces = lm.decode_engine.trace_count
    pieces = list(lm.stream(prompt, max_new_tokens=24, stop_token_ids=None))
    assert "".join(pieces) == expected
    # `generate` runs the programs `stream` runs: nothing new to compile.
    assert lm.decode_engine.trace_count == traces
    assert len(pieces) > 5
    # Multi-byte characters made of byte tokens arrive whole: no piece ends
    # inside one.
    assert any(ord(char) > 0x2000 for char in expected)
    assert all(not piece.endswith("\ufffd") for piece in pieces[:-1])


def _swap_embedding_rows(lm, first, second):
    table = lm.backbone.token_embedding.embeddings
    values = _numpy(table).copy()
    values[[first, second]] = values[[second, first]]
    table.assign(values)


def test_auto_stop_tokens(lm):
    """Swapping two embedding rows relabels two tokens without changing the
    model, so a token of the greedy output can be turned into `<eos>` or
    `<end_of_turn>` at a known step."""
    tokenizer = lm.preprocessor.tokenizer
    eos, end_of_turn = tokenizer.eos_token_id, tokenizer.end_of_turn_token_id
    prompt = lm.preprocessor.generate_preprocess(["Hello"], sequence_length=8)
    length = int(prompt["padding_mask"].sum())
    output = lm.generate(prompt, max_new_tokens=20, stop_token_ids=None)
    full = output["token_ids"][0, length : length + 20].tolist()
    assert eos not in full and end_of_turn not in full
    step = next(
        index
        for index in range(3, 20)
        if full[index] not in full[:index] + prompt["token_ids"][0].tolist()
    )
    target = full[step]

    def generated(**kwargs):
        out = lm.generate(prompt, max_new_tokens=20, **kwargs)
        return out["token_ids"][0, length : out["padding_mask"][0].sum()].tolist()

    _swap_embedding_rows(lm, target, eos)
    try:
        assert generated() == full[:step] + [eos]
        assert len(generated(stop_token_ids=None)) == 20
    finally:
        _swap_embedding_rows(lm, target, eos)

    _swap_embedding_rows(lm, target, end_of_turn)
    try:
        assert len(generated()) == 20  # a base model does not stop on it
        lm.instruction_tuned = True
        assert generated() == full[:step] + [end_of_turn]
        # An explicit list replaces the automatic stop tokens.
        assert generated(stop_token_ids=[full[1]]) == full[: full.index(full[1]) + 1]
    finally:
        lm.instruction_tuned = False
        _swap_embedding_rows(lm, target, end_of_turn)


# -- scoring ------------------------------------------------------------------


def test_score_logits_and_loss(lm):
    x, labels, _ = lm.preprocessor(TEXTS[:2], sequence_length=12)
    logits = _numpy(lm.score(x["token_ids"], x["padding_mask"]))
    np.testing.assert_allclose(logits, _numpy(lm(x)), atol=1e-5)

    losses = _numpy(
        lm.score(
            x["token_ids"], x["padding_mask"], target_ids=labels, scoring_mode="loss"
        )
    )
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    expected = expected * x["padding_mask"]
    np.testing.assert_allclose(losses, expected, atol=1e-4)
    perplexity = np.exp(losses.sum() / x["padding_mask"].sum())
    assert 1.0 < perplexity < 10 * lm.backbone.vocabulary_size


# -- bad input ----------------------------------------------------------------


def _left_padded():
    return {
        "token_ids": np.array([[0, 2, 5]]),
        "padding_mask": np.array([[0, 1, 1]], bool),
    }


BAD_GENERATE_CALLS = [
    (("The quick brown fox jumps",), {"max_length": 3}, "more than `max_length`=3"),
    (("Hello",), {"max_new_tokens": 0}, "`max_new_tokens` must be a positive"),
    (("Hello",), {"max_new_tokens": -3}, "`max_new_tokens` must be a positive"),
    (("Hello",), {"max_length": 0}, "`max_length` must be a positive"),
    (("Hello",), {"max_new_tokens": 2.5}, "`max_new_tokens` must be a positive"),
    (("Hello",), {"sampler": "nucleus"}, "Unknown `sampler` 'nucleus'; allowed"),
    (("Hello",), {"sampler": {"name": "top_p", "p": 1.5}}, r"`top_p` \(`p`\)"),
    (("Hello",), {"sampler": {"name": "top_p", "p": 0}}, r"`top_p` \(`p`\)"),
    (("Hello",), {"sampler": {"name": "top_k", "k": 0}}, "`k` must be a positive"),
    (("Hello",), {"sampler": {"name": "random", "temperature": 0}}, "`temperature`"),
    (([],), {}, "empty list"),
    (("Hello",), {"stop_token_ids": "eos"}, "`stop_token_ids` must be"),
    (("Hello",), {"stop_token_ids": [10**6]}, "`stop_token_ids` must be"),
    (("Hello",), {"seed": "x"}, "`seed` must be an integer"),
    ((_left_padded(),), {}, "right-padded"),
    (({"token_ids": np.array([[2, 5]])},), {}, "'padding_mask'"),
]


@pytest.mark.parametrize(
    "args, kwargs, message",
    BAD_GENERATE_CALLS,
    ids=[f"{i}-{m[:20]}" for i, (_, _, m) in enumerate(BAD_GENERATE_CALLS)],
)
def test_bad_generate_arguments_fail_before_compute(lm, args, kwargs, message):
    engine = lm.decode_engine
    traces = engine.trace_count
    with pytest.raises(ValueError, match=message):
        lm.generate(*args, **kwargs)
    if isinstance(args[0], str):
        with pytest.raises(ValueError, match=message):
            lm.stream(*args, **kwargs)
    assert engine.trace_count == traces


def test_bad_stream_and_score_arguments(lm, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("ran before checking its arguments")

    monkeypatch.setattr(lm.decode_engine, "stream", no_compute)
    monkeypatch.setattr(lm.decode_engine, "score", no_compute)
    with pytest.raises(ValueError, match="beam search"):
        lm.stream("Hello", sampler="beam")
    with pytest.raises(ValueError, match="one string prompt"):
        lm.stream(["Hello", "Hi"])
    with pytest.raises(ValueError, match="`scoring_mode` must be one of"):
        lm.score(np.array([[2, 5]]), scoring_mode="perplexity")
    with pytest.raises(ValueError, match="needs `target_ids`"):
        lm.score(np.array([[2, 5]]), scoring_mode="loss")
    without_preprocessor = GemmaCausalLM(lm.backbone)
    with pytest.raises(ValueError, match="needs a preprocessor"):
        without_preprocessor.generate("Hello")


def test_saving_keeps_the_sampler_and_compile_settings(lm, tmp_path):
    lm.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        sampler={"name": "top_k", "k": 3, "temperature": 0.5},
    )
    try:
        path = str(tmp_path / "lm.keras")
        lm.save(path)
        restored = keras.saving.load_model(path)
    finally:
        lm.compile()
    assert isinstance(restored, GemmaCausalLM)
    assert restored.sampler.get_config() == {"k": 3, "temperature": 0.5}
    assert isinstance(restored.optimizer, keras.optimizers.SGD)
    assert restored.preprocessor.sequence_length == lm.preprocessor.sequence_length
    for restored_weight, weight in zip(restored.weights, lm.weights):
        np.testing.assert_array_equal(_numpy(restored_weight), _numpy(weight))
