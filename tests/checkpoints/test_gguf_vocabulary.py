import os

import gguf
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from keras_gemma.checkpoints import gguf_vocabulary
from keras_gemma.checkpoints.gguf_vocabulary import (
    build_sentencepiece_proto,
    cached_sentencepiece_proto,
    gguf_to_sentencepiece_proto,
    read_gguf_metadata,
    read_gguf_vocabulary,
)
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer
from tests import tokenizer_fixtures
from tests.tokenizer_fixtures import SAMPLE_TEXTS, write_llama_cpp_gguf

# Shared fixtures; pytest finds them as attributes of this module.
gemma3_gguf_path = tokenizer_fixtures.gemma3_gguf_path
gemma3_tokenizer = tokenizer_fixtures.gemma3_tokenizer
tiny_gguf_path = tokenizer_fixtures.tiny_gguf_path
tiny_proto = tokenizer_fixtures.tiny_proto
tiny_tokenizer = tokenizer_fixtures.tiny_tokenizer

Piece = model_pb2.ModelProto.SentencePiece
SPACES_TEXTS = [" " * n for n in range(1, 12)] + ["a  b", "\t \t  x"]


def test_reader_matches_gguf_reader(tiny_gguf_path):
    ours = read_gguf_vocabulary(tiny_gguf_path)
    theirs = read_gguf_vocabulary(gguf.GGUFReader(tiny_gguf_path))
    assert ours["tokens"] == theirs["tokens"]
    np.testing.assert_array_equal(ours["scores"], theirs["scores"])
    np.testing.assert_array_equal(ours["token_types"], theirs["token_types"])
    for key in ("bos_id", "eos_id", "unk_id", "pad_id", "model", "architecture"):
        assert ours[key] == theirs[key], key
    assert ours["add_space_prefix"] is theirs["add_space_prefix"] is False
    assert (ours["bos_id"], ours["eos_id"], ours["unk_id"], ours["pad_id"]) == (
        2,
        1,
        3,
        0,
    )
    assert ours["model"] == "llama" and ours["architecture"] == "gemma3"
    metadata = read_gguf_metadata(tiny_gguf_path)
    assert metadata["general.architecture"] == "gemma3"
    assert metadata["tokenizer.ggml.add_bos_token"] is True


def test_tiny_gguf_tokenizes_like_the_original_and_transformers(
    tiny_gguf_path, tiny_tokenizer
):
    import transformers

    from_gguf = GemmaTokenizer.from_preset(tiny_gguf_path)
    reference = transformers.AutoTokenizer.from_pretrained(
        os.fspath(tiny_gguf_path.parent), gguf_file=tiny_gguf_path.name
    )
    assert from_gguf.get_vocabulary() == tiny_tokenizer.get_vocabulary()
    for text in SAMPLE_TEXTS + SPACES_TEXTS:
        ids = from_gguf.tokenize(text)
        assert ids == tiny_tokenizer.tokenize(text), text
        assert ids == reference.encode(text, add_special_tokens=False), text
    # The same through an open GGUFReader, and from the directory.
    via_reader = GemmaTokenizer(
        proto=gguf_to_sentencepiece_proto(gguf.GGUFReader(tiny_gguf_path))
    )
    from_dir = GemmaTokenizer.from_preset(tiny_gguf_path.parent)
    for tokenizer in (via_reader, from_dir):
        assert tokenizer.tokenize(SAMPLE_TEXTS) == from_gguf.tokenize(SAMPLE_TEXTS)


def test_rebuilt_proto_settings(tiny_gguf_path):
    model = model_pb2.ModelProto.FromString(gguf_to_sentencepiece_proto(tiny_gguf_path))
    types = {piece.piece: piece.type for piece in model.pieces}
    assert [piece.piece for piece in model.pieces[:4]] == [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    ]
    # llama.cpp marks <unk> CONTROL; SentencePiece needs it UNKNOWN.
    assert types["<unk>"] == Piece.UNKNOWN
    assert types["<pad>"] == types["<eos>"] == types["<bos>"] == Piece.CONTROL
    # Other control tokens match inside text: USER_DEFINED.
    assert types["<start_of_turn>"] == Piece.USER_DEFINED
    # The run of spaces stored as "  " is SentencePiece's "▁▁".
    assert types["\u2581\u2581"] == Piece.USER_DEFINED
    assert "  " not in types
    assert types["<0x41>"] == Piece.BYTE
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    assert trainer.model_type == model_pb2.TrainerSpec.BPE
    assert trainer.byte_fallback and trainer.split_digits
    assert (trainer.pad_id, trainer.eos_id, trainer.bos_id, trainer.unk_id) == (
        0,
        1,
        2,
        3,
    )
    assert trainer.vocab_size == len(model.pieces)
    assert normalizer.name == "identity"
    assert not normalizer.add_dummy_prefix
    assert not normalizer.remove_extra_whitespaces
    assert normalizer.escape_whitespaces


def test_gemma3_vocabulary(gemma3_gguf_path, gemma3_tokenizer):
    vocab = read_gguf_vocabulary(gemma3_gguf_path)
    assert len(vocab["tokens"]) == len(vocab["scores"]) == 262144
    assert vocab["token_types"].dtype == np.int32
    assert vocab["tokens"][105:107] == ["<start_of_turn>", "<end_of_turn>"]
    assert vocab["tokens"][138] == "  "  # stored with real spaces
    assert vocab["token_types"][3] == 3  # <unk> typed CONTROL by llama.cpp
    assert vocab["chat_template"] is None
    model = model_pb2.ModelProto.FromString(gemma3_tokenizer.proto)
    assert model.pieces[3].type == Piece.UNKNOWN
    assert model.pieces[105].type == Piece.USER_DEFINED
    assert model.pieces[138].piece == "\u2581\u2581"
    assert model.pieces[238].piece == "<0x00>" and model.pieces[238].type == Piece.BYTE
    normal = [p.score for p in model.pieces if p.type == Piece.NORMAL]
    assert normal[:3] == [0.0, -1.0, -2.0]  # BPE merge priority kept


def _write_gguf(path, tokens, model="llama", types=None):
    writer = gguf.GGUFWriter(os.fspath(path), arch="gemma3")
    if model is not None:
        writer.add_tokenizer_model(model)
    if tokens is not None:
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types(types or [1] * len(tokens))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files(tmp_path, tiny_proto):
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(not_gguf)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_gguf_metadata(empty)
    truncated = tmp_path / "truncated.gguf"
    data = write_llama_cpp_gguf(tmp_path / "full.gguf", tiny_proto).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf_metadata(truncated)
    with pytest.raises(ValueError, match="No GGUF file"):
        gguf_to_sentencepiece_proto(tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="path to a .gguf file"):
        gguf_to_sentencepiece_proto(42)

    no_vocab = _write_gguf(tmp_path / "no_vocab.gguf", None)
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens is missing"):
        gguf_to_sentencepiece_proto(no_vocab)
    bpe = _write_gguf(tmp_path / "bpe.gguf", ["<unk>", "a"], model="gpt2")
    with pytest.raises(ValueError, match="of type 'gpt2'"):
        gguf_to_sentencepiece_proto(bpe)


def test_build_rejects_inconsistent_vocabularies():
    with pytest.raises(ValueError, match="same length"):
        build_sentencepiece_proto(["<unk>", "a"], [0.0], [2, 1])
    with pytest.raises(ValueError, match="no unknown token"):
        build_sentencepiece_proto(["a", "b"], [0.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match="both '▁▁'"):
        build_sentencepiece_proto(["<unk>", "\u2581\u2581", "  "], [0.0] * 3, [2, 1, 4])
    proto = build_sentencepiece_proto(
        ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab"],
        [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0],
        [3, 3, 3, 3, 1, 1, 1],
    )
    tokenizer = GemmaTokenizer(proto=proto)
    assert tokenizer.tokenize("abba") == [6, 5, 4]
    assert tokenizer.tokenize("<bos>c") == [2, 3]  # c is unknown, no bytes


def test_rebuilt_vocabulary_is_cached_beside_the_file(
    tiny_gguf_path, tmp_path, monkeypatch
):
    path = tmp_path / "model.gguf"
    path.write_bytes(open(tiny_gguf_path, "rb").read())
    expected = gguf_to_sentencepiece_proto(path)

    assert cached_sentencepiece_proto(path) == expected
    written = [name for name in os.listdir(tmp_path) if name != "model.gguf"]
    assert len(written) == 1 and written[0].endswith(".tokenizer.model")

    # The second load reads the cache instead of rebuilding.
    def rebuild(_):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(gguf_vocabulary, "gguf_to_sentencepiece_proto", rebuild)
    assert cached_sentencepiece_proto(path) == expected

    # A changed file gets its own cache entry, not the stale one.
    monkeypatch.undo()
    os.utime(path, ns=(1, 1))
    assert cached_sentencepiece_proto(path) == expected
    assert len(os.listdir(tmp_path)) == 3


def test_unwritable_directory_means_no_cache(tiny_gguf_path, tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(open(tiny_gguf_path, "rb").read())

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(gguf_vocabulary.os, "replace", refuse)
    assert cached_sentencepiece_proto(path) == gguf_to_sentencepiece_proto(path)
    assert os.listdir(tmp_path) == ["model.gguf"]
