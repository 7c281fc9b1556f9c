import io
import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer
from tests import tokenizer_fixtures
from tests.tokenizer_fixtures import SAMPLE_TEXTS, as_lists, train_sentencepiece

# Shared fixtures; pytest finds them as attributes of this module.
gemma3_gguf_path = tokenizer_fixtures.gemma3_gguf_path
gemma3_reference = tokenizer_fixtures.gemma3_reference
gemma3_tokenizer = tokenizer_fixtures.gemma3_tokenizer
tiny_model_dir = tokenizer_fixtures.tiny_model_dir
tiny_proto = tokenizer_fixtures.tiny_proto
tiny_reference = tokenizer_fixtures.tiny_reference
tiny_tokenizer = tokenizer_fixtures.tiny_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

# Real-vocabulary strings: the shared samples plus runs of spaces (shorter
# than 32: see test_gemma3_runs_of_32_spaces_or_more), newlines and tabs.
GEMMA3_TEXTS = (
    SAMPLE_TEXTS
    + [" " * n for n in (1, 2, 3, 7, 16, 31)]
    + ["\n" * n for n in (1, 2, 5, 31, 33)]
    + ["\t" * n for n in (1, 4, 31)]
    + ["word  \n\n  word\t \t", "<start_of_image><end_of_image>", "<unused17>x"]
)


# ------------------------------------------------- ids against transformers


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_tiny_ids_match_transformers(tiny_tokenizer, tiny_reference, text):
    expected = tiny_reference.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.tokenize(text) == expected
    assert tiny_tokenizer.tokenize(text, add_bos=True) == [2] + expected
    assert tiny_tokenizer.tokenize(text, add_eos=True) == expected + [1]
    # Decoding gives back the text, as transformers' decode does.
    assert tiny_tokenizer.detokenize(expected) == text
    assert tiny_reference.decode(expected) == text


def test_tiny_vocabulary_matches_transformers(tiny_tokenizer, tiny_reference):
    size = tiny_tokenizer.vocabulary_size()
    assert size == len(tiny_reference) == len(tiny_tokenizer.get_vocabulary())
    assert tiny_tokenizer.get_vocabulary() == tiny_reference.convert_ids_to_tokens(
        list(range(size))
    )
    for token_id in (0, 1, 2, 3, 5, 100, size - 1):
        piece = tiny_tokenizer.id_to_token(token_id)
        assert piece == tiny_reference.convert_ids_to_tokens(token_id)
        assert tiny_tokenizer.token_to_id(piece) == token_id


def test_gemma3_ids_match_transformers(gemma3_tokenizer, gemma3_reference):
    assert len(GEMMA3_TEXTS) >= 30
    ours = gemma3_tokenizer.tokenize(GEMMA3_TEXTS)
    for text, ids in zip(GEMMA3_TEXTS, ours):
        assert ids == gemma3_reference.encode(text, add_special_tokens=False), text
        assert gemma3_tokenizer.tokenize(text) == ids
    # The reference adds <bos> by default (the GGUF says add_bos_token).
    for text in GEMMA3_TEXTS[:5]:
        assert gemma3_tokenizer.tokenize(text, add_bos=True) == (
            gemma3_reference.encode(text)
        )


def test_gemma3_detokenize_matches_transformers(gemma3_tokenizer, gemma3_reference):
    batch = gemma3_tokenizer.tokenize(GEMMA3_TEXTS)
    assert gemma3_tokenizer.detokenize(batch) == GEMMA3_TEXTS
    for ids in batch:
        assert gemma3_tokenizer.detokenize(ids) == gemma3_reference.decode(ids)
    ids = [2, 105, 2364, 107, 9259, 106, 1, 0]
    assert gemma3_tokenizer.detokenize(ids) == gemma3_reference.decode(ids)
    assert gemma3_tokenizer.detokenize(ids, skip_special_tokens=True) == "user\nHello"


def test_gemma3_vocabulary(gemma3_tokenizer, gemma3_reference):
    tokenizer = gemma3_tokenizer
    assert tokenizer.vocabulary_size() == 262144
    vocabulary = tokenizer.get_vocabulary()
    assert vocabulary == gemma3_reference.convert_ids_to_tokens(list(range(262144)))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert tokenizer.start_of_turn_token_id == 105
    assert tokenizer.end_of_turn_token_id == 106
    assert tokenizer.start_of_image_token_id == 255999
    assert tokenizer.end_of_image_token_id == 256000
    assert tokenizer.start_of_turn_token == "<start_of_turn>"
    # Gemma 3 has no fill-in-the-middle tokens (CodeGemma does).
    assert tokenizer.fim_prefix_token_id is None
    assert tokenizer.file_separator_token is None
    # The space runs llama.cpp stores with real spaces come back as "▁".
    assert tokenizer.id_to_token(138) == "\u2581\u2581"
    assert tokenizer.token_to_id("\u2581" * 31) == 167
    special = set(tokenizer.special_token_ids)
    assert {0, 1, 2, 3, 4, 105, 106, 255999, 256000, 6, 262143} <= special
    assert tokenizer.token_to_id("<table>") not in special
    assert 107 not in special  # "\n"


def test_gemma3_runs_of_32_spaces_or_more(gemma3_tokenizer):
    # SentencePiece (and llama.cpp) match the longest user-defined run of
    # spaces first (31 is the longest piece); transformers' GGUF tokenizer
    # splits such runs differently, so this is checked against the pieces.
    run31 = gemma3_tokenizer.token_to_id("\u2581" * 31)
    run9 = gemma3_tokenizer.token_to_id("\u2581" * 9)
    assert gemma3_tokenizer.tokenize(" " * 40) == [run31, run9]
    assert gemma3_tokenizer.detokenize([run31, run9]) == " " * 40


def test_control_tokens_in_text_are_single_tokens(tiny_tokenizer, gemma3_tokenizer):
    for tokenizer in (tiny_tokenizer, gemma3_tokenizer):
        ids = tokenizer.tokenize("<bos><start_of_turn>user\nHi<end_of_turn><eos>")
        assert ids[:2] == [tokenizer.bos_token_id, tokenizer.start_of_turn_token_id]
        assert tokenizer.end_of_turn_token_id in ids
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.tokenize("<pad>") == [tokenizer.pad_token_id]
    assert gemma3_tokenizer.tokenize("a<unused0>b")[1] == 6
    assert tiny_tokenizer.tokenize("<|fim_middle|>") == [
        tiny_tokenizer.fim_middle_token_id
    ]


# ---------------------------------------------------------- input forms


def test_input_forms(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    texts = ["Hello world", "", "12 ab"]
    expected = [tokenizer.tokenize(text) for text in texts]
    assert all(isinstance(i, int) for i in expected[0])
    assert tokenizer.tokenize(texts) == expected
    assert tokenizer.tokenize(tuple(texts)) == expected
    assert tokenizer.tokenize(np.array(texts)) == expected
    assert tokenizer.tokenize(np.array(texts, dtype=object)) == expected
    assert tokenizer.tokenize(np.array([t.encode() for t in texts])) == expected
    assert tokenizer.tokenize(np.array(texts[0])) == expected[0]
    assert tokenizer.tokenize(texts[0].encode("utf-8")) == expected[0]
    assert tokenizer.tokenize(np.array([texts[:2], texts[1:]])) == [
        expected[:2],
        expected[1:],
    ]
    assert tokenizer.tokenize([]) == []
    assert tokenizer(texts) == expected  # calling the layer tokenizes
    assert tokenizer.tokenize(texts, add_bos=True, add_eos=True) == [
        [2] + ids + [1] for ids in expected
    ]


def test_empty_string(tiny_tokenizer):
    assert tiny_tokenizer.tokenize("") == []
    assert tiny_tokenizer.tokenize("", add_bos=True) == [2]
    assert tiny_tokenizer.tokenize([""]) == [[]]
    assert tiny_tokenizer.detokenize([]) == ""
    assert tiny_tokenizer.detokenize([[], [2]]) == ["", "<bos>"]


def test_detokenize_forms(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    texts = ["Hello world", "fox"]
    batch = tokenizer.tokenize(texts)
    assert tokenizer.detokenize(batch) == texts
    assert tokenizer.detokenize(batch[0]) == texts[0]
    assert tokenizer.detokenize(tuple(batch[0])) == texts[0]
    assert tokenizer.detokenize(np.array(batch[0], np.int64)) == texts[0]
    assert tokenizer.detokenize([np.array(row) for row in batch]) == texts
    padded = np.zeros((2, 12), np.int32)
    for row, ids in enumerate(batch):
        padded[row, : len(ids)] = ids
    assert tokenizer.detokenize(padded, skip_special_tokens=True) == texts
    assert tokenizer.detokenize(padded)[1].startswith("fox<pad>")
    # Backend tensors (JAX array, torch tensor, tf.Tensor) are accepted.
    tensor = keras.ops.convert_to_tensor(np.array(batch[0], np.int32))
    decoded = tokenizer.detokenize(tensor)
    if tf.is_tensor(decoded):
        decoded = decoded.numpy().decode("utf-8")
    assert decoded == texts[0]


def test_special_tokens(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    expected = {
        "pad": (0, "<pad>"),
        "eos": (1, "<eos>"),
        "bos": (2, "<bos>"),
        "unk": (3, "<unk>"),
        "mask": (4, "<mask>"),
        "start_of_turn": (5, "<start_of_turn>"),
        "end_of_turn": (6, "<end_of_turn>"),
        "fim_prefix": (7, "<|fim_prefix|>"),
        "fim_middle": (8, "<|fim_middle|>"),
        "fim_suffix": (9, "<|fim_suffix|>"),
        "file_separator": (10, "<|file_separator|>"),
        "start_of_image": (11, "<start_of_image>"),
        "end_of_image": (12, "<end_of_image>"),
    }
    for name, (token_id, piece) in expected.items():
        assert getattr(tokenizer, f"{name}_token_id") == token_id, name
        assert getattr(tokenizer, f"{name}_token") == piece, name
        assert tokenizer.token_to_id(piece) == token_id
    assert tokenizer.start_token_id == 2 and tokenizer.end_token_id == 1
    assert set(tokenizer.special_token_ids) == set(range(14))  # + <unused0>
    text = "<start_of_turn>model\nHi<end_of_turn><eos><pad>"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert (
        tokenizer.detokenize(tokenizer.tokenize(text), skip_special_tokens=True)
        == "model\nHi"
    )


def test_tokens_absent_from_the_vocabulary_are_none():
    # A Gemma 1 like vocabulary: no turn, image or fill-in-the-middle tokens.
    tokenizer = GemmaTokenizer(proto=train_sentencepiece(["\n", "\t"]))
    assert tokenizer.bos_token_id == 2
    assert tokenizer.start_of_turn_token_id is None
    assert tokenizer.end_of_turn_token is None
    assert tokenizer.fim_prefix_token_id is None
    assert tokenizer.start_of_image_token_id is None
    assert set(tokenizer.special_token_ids) == {0, 1, 2, 3}


def test_lookup_tables_are_built_when_first_needed(tiny_proto):
    """Loading, tokenizing and decoding read no lookup table: they cost a
    loop over every piece, 0.2 s of loading the real vocabulary."""
    tokenizer = GemmaTokenizer(proto=tiny_proto)
    ids = tokenizer.tokenize("<start_of_turn>model\nHi")
    assert tokenizer.detokenize(ids) == "<start_of_turn>model\nHi"
    assert tokenizer.end_of_turn_token_id == 6
    assert tokenizer.vocabulary_size() > 14
    built = vars(tokenizer._tables)
    assert not {"pieces", "piece_ids", "special_ids", "special_mask"} & set(built)
    assert tokenizer.detokenize(ids, skip_special_tokens=True) == "model\nHi"
    assert {"pieces", "special_ids", "special_mask"} <= set(vars(tokenizer._tables))
    assert tokenizer.token_to_id("<end_of_turn>") == 6
    assert tokenizer.id_to_token(6) == "<end_of_turn>"


# ---------------------------------------------------------------- tf.data


def test_tf_data_gives_the_eager_ids(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    expected = tokenizer.tokenize(SAMPLE_TEXTS, add_bos=True)

    unbatched = tf.data.Dataset.from_tensor_slices(SAMPLE_TEXTS).map(
        lambda text: tokenizer.tokenize(text, add_bos=True)
    )
    assert [as_lists(ids) for ids in unbatched] == expected

    batched = tf.data.Dataset.from_tensor_slices(SAMPLE_TEXTS).batch(7).map(tokenizer)
    got = []
    for ids in batched:
        assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
        got.extend(as_lists(ids))
    assert got == tokenizer.tokenize(SAMPLE_TEXTS)

    decoded = (
        tf.data.Dataset.from_tensor_slices(SAMPLE_TEXTS)
        .batch(7)
        .map(tokenizer)
        .map(tokenizer.detokenize)
        .unbatch()
    )
    assert [text.numpy().decode("utf-8") for text in decoded] == SAMPLE_TEXTS


def test_tf_tensors_eagerly(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    ids = tokenizer.tokenize(tf.constant("Hello world"), add_bos=True, add_eos=True)
    assert isinstance(ids, tf.Tensor)
    assert as_lists(ids) == tokenizer.tokenize("Hello world", True, True)
    ragged = tokenizer.tokenize(tf.constant(["Hello", ""]), add_eos=True)
    assert as_lists(ragged) == [tokenizer.tokenize("Hello") + [1], [1]]
    texts = tokenizer.detokenize(ragged, skip_special_tokens=True)
    assert [t.decode() for t in texts.numpy()] == ["Hello", ""]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.detokenize(tf.constant([1, 99999]))
    with pytest.raises(TypeError, match="tf.string"):
        tokenizer.tokenize(tf.constant([1, 2]))


def test_gemma3_tf_data_gives_the_eager_ids(gemma3_tokenizer):
    expected = gemma3_tokenizer.tokenize(GEMMA3_TEXTS)
    dataset = tf.data.Dataset.from_tensor_slices(GEMMA3_TEXTS).batch(16)
    got = []
    for ids in dataset.map(gemma3_tokenizer):
        got.extend(as_lists(ids))
    assert got == expected


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, message",
    [
        (None, "got None"),
        (42, "got a value of type int"),
        (["ok", None], r"inputs\[1\]"),
        (["ok", 3.5], r"inputs\[1\]"),
        (np.array([1, 2]), "dtype int"),
        ({"text": "x"}, "type dict"),
    ],
)
def test_tokenize_rejects_non_strings(tiny_tokenizer, bad, message):
    with pytest.raises(TypeError, match=message):
        tiny_tokenizer.tokenize(bad)


def test_detokenize_rejects_bad_ids(tiny_tokenizer):
    size = tiny_tokenizer.vocabulary_size()
    with pytest.raises(ValueError, match=f"Token id {size} is outside"):
        tiny_tokenizer.detokenize([5, size])
    with pytest.raises(ValueError, match="Token id -1 is outside"):
        tiny_tokenizer.detokenize(np.array([[5, -1]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_tokenizer.id_to_token(size)
    with pytest.raises(TypeError, match="integer"):
        tiny_tokenizer.detokenize(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="token ids"):
        tiny_tokenizer.detokenize("Hello")
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        tiny_tokenizer.detokenize([[1, 2], ["a"]])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tiny_tokenizer.token_to_id("no such piece")


def test_bad_proto(tmp_path, tiny_proto):
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        GemmaTokenizer(proto=b"\x00\x01garbage that is not a model proto")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        GemmaTokenizer(proto=b"")
    with pytest.raises(ValueError, match="no file at"):
        GemmaTokenizer(proto=str(tmp_path / "missing.model"))
    with pytest.raises(TypeError, match="`proto` is required"):
        GemmaTokenizer(proto=None)
    with pytest.raises(TypeError, match="`proto` must be"):
        GemmaTokenizer(proto=12)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("just some text, not a model\n")
    with pytest.raises(ValueError, match="SentencePiece model"):
        GemmaTokenizer(proto=str(text_file))

    # A SentencePiece model without Gemma's special pieces.
    import sentencepiece

    from tests.tokenizer_fixtures import TINY_CORPUS

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 5),
        model_writer=buffer,
        vocab_size=150,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="not a Gemma vocabulary.*<pad>"):
        GemmaTokenizer(proto=buffer.getvalue())


# ---------------------------------------------------- serialization, presets


def test_config_round_trip_without_the_file(tmp_path, tiny_proto):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tiny_proto)
    tokenizer = GemmaTokenizer(proto=str(path), name="gemma_tokenizer")
    path.unlink()

    config = tokenizer.get_config()
    json.dumps(config)  # plain JSON
    restored = GemmaTokenizer.from_config(config)
    assert restored.name == "gemma_tokenizer"
    assert restored.get_vocabulary() == tokenizer.get_vocabulary()
    assert restored.tokenize(SAMPLE_TEXTS) == tokenizer.tokenize(SAMPLE_TEXTS)
    assert restored.proto == tiny_proto

    serialized = keras.saving.serialize_keras_object(tokenizer)
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert isinstance(revived, GemmaTokenizer)
    assert revived.tokenize(SAMPLE_TEXTS) == tokenizer.tokenize(SAMPLE_TEXTS)


@keras.saving.register_keras_serializable(package="keras_gemma_tests")
class _ModelWithTokenizer(keras.Model):
    """A model holding a preprocessor, saved and reloaded as `.keras`."""

    def __init__(self, preprocessor, **kwargs):
        super().__init__(**kwargs)
        self.preprocessor = preprocessor
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)

    def get_config(self):
        config = super().get_config()
        config["preprocessor"] = keras.saving.serialize_keras_object(self.preprocessor)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["preprocessor"] = keras.saving.deserialize_keras_object(
            config["preprocessor"]
        )
        return cls(**config)


def test_keras_file_round_trip(tmp_path, tiny_proto):
    source = tmp_path / "tokenizer.model"
    source.write_bytes(tiny_proto)
    tokenizer = GemmaTokenizer(proto=str(source))
    model = _ModelWithTokenizer(GemmaCausalLMPreprocessor(tokenizer, sequence_length=6))
    model(np.zeros((1, 3), "float32"))
    model.save(tmp_path / "model.keras")
    source.unlink()

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.preprocessor.tokenizer, GemmaTokenizer)
    assert loaded.preprocessor.sequence_length == 6
    assert loaded.preprocessor.tokenizer.tokenize(SAMPLE_TEXTS) == tokenizer.tokenize(
        SAMPLE_TEXTS
    )


def test_from_preset(tmp_path, tiny_proto, tiny_model_dir, tiny_tokenizer):
    expected = tiny_tokenizer.tokenize(SAMPLE_TEXTS)
    # A directory with tokenizer.model, keras-hub's tokenizer asset layout,
    # the file itself. Whole checkpoints are tested in tests/checkpoints.
    keras_hub = tmp_path / "keras_hub_preset"
    (keras_hub / "assets" / "tokenizer").mkdir(parents=True)
    (keras_hub / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(tiny_proto)
    for preset in (
        tiny_model_dir,
        str(tiny_model_dir),
        keras_hub,
        tiny_model_dir / "tokenizer.model",
    ):
        assert GemmaTokenizer.from_preset(preset).tokenize(SAMPLE_TEXTS) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        GemmaTokenizer.from_preset(empty)
    with pytest.raises(ValueError, match="no such file or directory"):
        GemmaTokenizer.from_preset(tmp_path / "nowhere")


def _fenced_example(docstring):
    match = re.search(r"```python\n(.*?)```", docstring, re.DOTALL)
    assert match, "the docstring has no example"
    return textwrap.dedent(match.group(1))


@pytest.mark.parametrize("cls", [GemmaTokenizer, GemmaCausalLMPreprocessor])
def test_docstring_examples_run(cls, tmp_path, monkeypatch, tiny_proto):
    (tmp_path / "tokenizer.model").write_bytes(tiny_proto)
    monkeypatch.chdir(tmp_path)
    namespace = {
        "GemmaTokenizer": GemmaTokenizer,
        "GemmaCausalLMPreprocessor": GemmaCausalLMPreprocessor,
    }
    exec(_fenced_example(cls.__doc__), namespace)


def test_no_tensorflow_without_tf_inputs(tmp_path, tiny_proto):
    """Eager tokenization and preprocessing never import TensorFlow."""
    (tmp_path / "tokenizer.model").write_bytes(tiny_proto)
    script = textwrap.dedent(
        """
        import sys
        import keras_gemma.chat as chat
        from keras_gemma.models.gemma_tokenizer import GemmaTokenizer
        from keras_gemma.models.gemma_causal_lm_preprocessor import (
            GemmaCausalLMPreprocessor,
        )
        from keras_gemma.checkpoints import gguf_vocabulary

        tokenizer = GemmaTokenizer.from_preset(sys.argv[1])
        ids = tokenizer.tokenize(["Hello world", ""])
        assert tokenizer.detokenize(ids) == ["Hello world", ""]
        preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
        preprocessor(["Hello world"])
        prompt = chat.render_chat([{"role": "user", "content": "Hi"}])
        preprocessor.generate_postprocess(preprocessor.generate_preprocess(prompt))
        preprocessor.chat_preprocess([{"role": "user", "content": "Hi"}])
        loaded = [m for m in ("tensorflow", "tensorflow_text") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    backend = keras.backend.backend()
    env = dict(os.environ, KERAS_BACKEND=backend if backend != "tensorflow" else "jax")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
