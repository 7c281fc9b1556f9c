import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gemma.chat import render_chat
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer
from tests import tokenizer_fixtures
from tests.tokenizer_fixtures import SAMPLE_TEXTS

# Shared fixtures; pytest finds them as attributes of this module.
gemma3_gguf_path = tokenizer_fixtures.gemma3_gguf_path
gemma3_reference = tokenizer_fixtures.gemma3_reference
gemma3_tokenizer = tokenizer_fixtures.gemma3_tokenizer
tiny_proto = tokenizer_fixtures.tiny_proto
tiny_tokenizer = tokenizer_fixtures.tiny_tokenizer

PAD, EOS, BOS = 0, 1, 2
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "", "12 ab"]

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello"},
    {"role": "model", "content": "Hello world"},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox."},
]


@pytest.fixture()
def preprocessor(tiny_tokenizer):
    return GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=12)


def expected_packing(tokenizer, text, length, start=True, end=True):
    ids = tokenizer.tokenize(text)
    ids = ([BOS] if start else []) + ids + ([EOS] if end else [])
    ids = ids[:length]
    return ids + [PAD] * (length - len(ids)), [True] * len(ids) + [False] * (
        length - len(ids)
    )


def test_fit_outputs(preprocessor, tiny_tokenizer):
    x, y, sample_weight = preprocessor(TEXTS)
    assert set(x) == {"token_ids", "padding_mask"}
    token_ids, mask = x["token_ids"], x["padding_mask"]
    assert token_ids.shape == mask.shape == y.shape == sample_weight.shape == (4, 12)
    assert token_ids.dtype == np.int32 and y.dtype == np.int32
    assert mask.dtype == bool and sample_weight.dtype == np.float32
    for row, text in enumerate(TEXTS):
        packed, packed_mask = expected_packing(tiny_tokenizer, text, 13)
        assert token_ids[row].tolist() == packed[:12]
        assert y[row].tolist() == packed[1:]
        assert mask[row].tolist() == packed_mask[:12]
        assert sample_weight[row].tolist() == [float(m) for m in packed_mask[1:]]
    # Labels are the ids shifted left by one; weights the mask shifted likewise.
    np.testing.assert_array_equal(y[:, :-1], token_ids[:, 1:])
    np.testing.assert_array_equal(sample_weight[:, :-1], mask[:, 1:])
    # The empty string: <bos> then <eos> as its only label.
    assert token_ids[2, :2].tolist() == [BOS, EOS]
    assert sample_weight[2].tolist() == [1.0] + [0.0] * 11


def test_truncation_and_options(tiny_tokenizer):
    long_text = TEXTS[1] * 3
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=8)
    x, y, sample_weight = preprocessor(long_text)  # a string: no batch axis
    ids = [BOS] + tiny_tokenizer.tokenize(long_text)
    assert x["token_ids"].tolist() == ids[:8]
    assert y.tolist() == ids[1:9]  # cut text: no <eos>
    assert x["padding_mask"].all() and (sample_weight == 1).all()

    x, y, _ = preprocessor(TEXTS[:1], sequence_length=20)
    assert x["token_ids"].shape == (1, 20)

    bare = GemmaCausalLMPreprocessor(
        tiny_tokenizer, sequence_length=6, add_start_token=False, add_end_token=False
    )
    x, y, _ = bare(["Hello world"])
    packed, mask = expected_packing(tiny_tokenizer, "Hello world", 7, False, False)
    assert x["token_ids"][0].tolist() == packed[:6]
    assert y[0].tolist() == packed[1:]


def test_literal_bos_is_not_doubled(preprocessor, tiny_tokenizer):
    x, _, _ = preprocessor(["<bos>Hello world", "Hello world"])
    np.testing.assert_array_equal(x["token_ids"][0], x["token_ids"][1])
    prompt = preprocessor.generate_preprocess("<bos>Hello")
    assert prompt["token_ids"][:2].tolist() == [
        BOS,
        tiny_tokenizer.tokenize("Hello")[0],
    ]


def test_numpy_and_tuple_inputs(preprocessor):
    expected = preprocessor(TEXTS)
    for inputs in (np.array(TEXTS), tuple(TEXTS), np.array(TEXTS, dtype=object)):
        got = preprocessor(inputs)
        for a, b in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
            np.testing.assert_array_equal(a, b)


def test_tf_data_matches_eager(preprocessor):
    expected = preprocessor(SAMPLE_TEXTS)
    batched = tf.data.Dataset.from_tensor_slices(SAMPLE_TEXTS).batch(8)
    outputs = list(batched.map(preprocessor))
    x = {
        key: np.concatenate([o[0][key].numpy() for o in outputs])
        for key in ("token_ids", "padding_mask")
    }
    y = np.concatenate([o[1].numpy() for o in outputs])
    weights = np.concatenate([o[2].numpy() for o in outputs])
    assert outputs[0][0]["token_ids"].dtype == tf.int32
    assert outputs[0][0]["padding_mask"].dtype == tf.bool
    assert outputs[0][2].dtype == tf.float32
    np.testing.assert_array_equal(x["token_ids"], expected[0]["token_ids"])
    np.testing.assert_array_equal(x["padding_mask"], expected[0]["padding_mask"])
    np.testing.assert_array_equal(y, expected[1])
    np.testing.assert_array_equal(weights, expected[2])

    unbatched = tf.data.Dataset.from_tensor_slices(SAMPLE_TEXTS[:5]).map(preprocessor)
    for row, (x_row, y_row, w_row) in enumerate(unbatched):
        assert x_row["token_ids"].shape == (12,)
        np.testing.assert_array_equal(x_row["token_ids"], expected[0]["token_ids"][row])
        np.testing.assert_array_equal(y_row, expected[1][row])
        np.testing.assert_array_equal(w_row, expected[2][row])

    # A text starting with a literal <bos> is not given a second one in TF.
    bos_texts = tf.data.Dataset.from_tensor_slices(["<bos>Hello", "Hello"]).batch(2)
    (x_bos, _, _) = next(iter(bos_texts.map(preprocessor)))
    np.testing.assert_array_equal(x_bos["token_ids"][0], x_bos["token_ids"][1])


def test_fit_accepts_the_outputs(tiny_tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=8)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="bool", name="padding_mask")
    hidden = keras.layers.Embedding(tiny_tokenizer.vocabulary_size(), 8)(token_ids)
    mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, "float32"), -1)
    logits = keras.layers.Dense(tiny_tokenizer.vocabulary_size())(hidden * mask)
    model = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y, sample_weight = preprocessor(TEXTS)
    history = model.fit(x, y, sample_weight=sample_weight, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ------------------------------------------------------------- generation


def test_generate_preprocess(preprocessor, tiny_tokenizer):
    prompts = preprocessor.generate_preprocess(["Hello world", ""])
    assert prompts["token_ids"].shape == (2, 12)
    assert prompts["token_ids"].dtype == np.int32
    assert prompts["padding_mask"].dtype == bool
    packed, mask = expected_packing(tiny_tokenizer, "Hello world", 12, end=False)
    assert prompts["token_ids"][0].tolist() == packed
    assert prompts["padding_mask"][0].tolist() == mask
    assert prompts["token_ids"][1].tolist() == [BOS] + [PAD] * 11

    single = preprocessor.generate_preprocess("Hello world", sequence_length=5)
    assert single["token_ids"].tolist() == packed[:5]
    assert single["padding_mask"].all()

    graph = tf.data.Dataset.from_tensor_slices(["Hello world", ""]).batch(2)
    (tf_prompts,) = list(graph.map(preprocessor.generate_preprocess))
    np.testing.assert_array_equal(tf_prompts["token_ids"], prompts["token_ids"])
    np.testing.assert_array_equal(tf_prompts["padding_mask"], prompts["padding_mask"])


def test_generate_postprocess(preprocessor, tiny_tokenizer):
    tok = tiny_tokenizer
    answer = tok.tokenize("Hello world")
    row = (
        [BOS, tok.start_of_turn_token_id]
        + tok.tokenize("model\n")
        + answer
        + [tok.end_of_turn_token_id, EOS]
    )
    token_ids = np.full((2, 24), PAD, np.int32)
    mask = np.zeros((2, 24), bool)
    token_ids[0, : len(row)] = row
    mask[0, : len(row)] = True
    token_ids[1, :3] = [BOS] + tok.tokenize("fox")[:1] + [4]  # 4 is <mask>
    mask[1, :2] = True  # the <mask> id is outside the padding mask
    expected = ["model\nHello world", tok.detokenize(tok.tokenize("fox")[:1])]
    outputs = {"token_ids": token_ids, "padding_mask": mask}
    assert preprocessor.generate_postprocess(outputs) == expected
    single = {"token_ids": token_ids[0], "padding_mask": mask[0]}
    assert preprocessor.generate_postprocess(single) == expected[0]
    # Backend tensors (JAX, torch, TF) and ids without a mask.
    tensors = {
        key: keras.ops.convert_to_tensor(value) for key, value in outputs.items()
    }
    assert preprocessor.generate_postprocess(tensors) == expected
    assert preprocessor.generate_postprocess(token_ids[:1]) == [expected[0]]

    # Inside a tf.data graph: string tensors.
    dataset = tf.data.Dataset.from_tensor_slices(outputs).batch(2)
    (texts,) = list(dataset.map(preprocessor.generate_postprocess))
    assert [t.decode("utf-8") for t in texts.numpy()] == expected

    # Round trip of prompts.
    assert preprocessor.generate_postprocess(
        preprocessor.generate_preprocess(SAMPLE_TEXTS[1:6], sequence_length=64)
    ) == [tok.detokenize(tok.tokenize(t), True) for t in SAMPLE_TEXTS[1:6]]


def test_gemma3_generate_round_trip(gemma3_tokenizer, gemma3_reference):
    preprocessor = GemmaCausalLMPreprocessor(gemma3_tokenizer, sequence_length=64)
    prompt = render_chat(
        [{"role": "user", "content": "Write a haiku."}], add_generation_prompt=True
    )
    packed = preprocessor.generate_preprocess(prompt)
    ids = packed["token_ids"][packed["padding_mask"]].tolist()
    assert ids == gemma3_reference.encode(prompt, add_special_tokens=False)
    assert ids[:4] == [2, 105, 2364, 107]  # <bos><start_of_turn>user\n
    assert preprocessor.generate_postprocess(packed) == "user\nWrite a haiku.\nmodel\n"


# ------------------------------------------------------------------- chat


def test_chat_preprocess(tiny_tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=128)
    x, y, sample_weight = preprocessor.chat_preprocess(CONVERSATION)
    ids = tiny_tokenizer.tokenize(render_chat(CONVERSATION))
    assert ids[0] == BOS and EOS not in ids
    length = len(ids)
    assert length < 128
    assert x["token_ids"][:length].tolist() == ids
    assert x["padding_mask"].tolist() == [True] * length + [False] * (128 - length)
    assert y[: length - 1].tolist() == ids[1:]
    # Loss only where the label is a model answer or the <end_of_turn>
    # closing it.
    trained = y[sample_weight == 1].tolist()
    assert tiny_tokenizer.detokenize(trained) == (
        "Hello world<end_of_turn>The quick brown fox.<end_of_turn>"
    )
    assert set(np.unique(sample_weight).tolist()) == {0.0, 1.0}
    assert (sample_weight[length - 1 :] == 0).all()

    # A batch of conversations, and truncation.
    second = tiny_tokenizer.tokenize(render_chat(CONVERSATION[1:3]))
    size = len(second) + 2
    assert size < length
    batch = [CONVERSATION, CONVERSATION[1:3]]
    x, y, sample_weight = preprocessor.chat_preprocess(batch, sequence_length=size)
    assert x["token_ids"].shape == y.shape == sample_weight.shape == (2, size)
    assert x["token_ids"][0].tolist() == ids[:size]
    assert y[0].tolist() == ids[1 : size + 1]
    assert x["token_ids"][1, : len(second)].tolist() == second
    assert tiny_tokenizer.detokenize(y[1][sample_weight[1] == 1].tolist()) == (
        "Hello world<end_of_turn>"
    )


def test_chat_preprocess_rejects_bad_conversations(preprocessor):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        preprocessor.chat_preprocess([{"role": "bot", "content": "hi"}])
    with pytest.raises(TypeError, match="conversation"):
        preprocessor.chat_preprocess("Hello")
    with pytest.raises(TypeError, match="conversation"):
        preprocessor.chat_preprocess([])


# ---------------------------------------------------------- config, errors


def test_config_round_trip(preprocessor, tiny_tokenizer):
    config = preprocessor.get_config()
    json.dumps(config)
    restored = GemmaCausalLMPreprocessor.from_config(config)
    assert isinstance(restored.tokenizer, GemmaTokenizer)
    assert restored.sequence_length == 12
    assert restored.add_start_token and restored.add_end_token
    serialized = keras.saving.serialize_keras_object(preprocessor)
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    for a, b in zip(
        keras.tree.flatten(revived(TEXTS)), keras.tree.flatten(preprocessor(TEXTS))
    ):
        np.testing.assert_array_equal(a, b)


def test_from_preset(tmp_path, tiny_proto, tiny_tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(tiny_proto)
    preprocessor = GemmaCausalLMPreprocessor.from_preset(tmp_path, sequence_length=5)
    assert preprocessor.sequence_length == 5
    assert preprocessor.tokenizer.get_vocabulary() == tiny_tokenizer.get_vocabulary()


def test_bad_arguments(preprocessor, tiny_tokenizer):
    with pytest.raises(TypeError, match="`tokenizer` must be a GemmaTokenizer"):
        GemmaCausalLMPreprocessor("tokenizer.model")
    with pytest.raises(ValueError, match="`sequence_length` must be a positive int"):
        GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=0)
    with pytest.raises(TypeError, match="`sequence_length` must be a positive int"):
        GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length="8")
    with pytest.raises(ValueError, match="pass only `x`"):
        preprocessor(TEXTS, y=np.zeros((4, 12)))
    with pytest.raises(TypeError, match="got None"):
        preprocessor(None)
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        preprocessor(["ok", 7])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        preprocessor.generate_postprocess({"token_ids": np.array([[1, 10**6]])})
    with pytest.raises(ValueError, match="'token_ids'"):
        preprocessor.generate_postprocess({"ids": np.array([[1]])})
    with pytest.raises(ValueError, match="padding_mask"):
        preprocessor.generate_postprocess(
            {"token_ids": np.ones((2, 3), "int32"), "padding_mask": np.ones((2, 4))}
        )
