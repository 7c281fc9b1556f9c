"""Rebuild a Gemma SentencePiece model from the vocabulary stored in a GGUF file.

llama.cpp's converter writes a SentencePiece vocabulary into GGUF metadata as
three parallel arrays (``tokenizer.ggml.tokens``, ``tokenizer.ggml.scores`` and
``tokenizer.ggml.token_type``) plus the ids of the special tokens. This module
turns those arrays back into a serialized SentencePiece ``ModelProto`` with
Gemma's settings, so :class:`keras_gemma.models.gemma_tokenizer.GemmaTokenizer`
can load a ``.gguf`` file like any ``tokenizer.model``:

* BPE model, byte fallback, digits split, no normalization (identity), no
  dummy prefix, spaces escaped as ``▁``;
* ``<pad>``, ``<eos>`` and ``<bos>`` are CONTROL pieces, ``<unk>`` is the
  UNKNOWN piece (llama.cpp marks it CONTROL, which SentencePiece rejects);
* every other token llama.cpp marks CONTROL (``<start_of_turn>``,
  ``<end_of_turn>``, ``<mask>``, ``<unusedN>``, ...) becomes a USER_DEFINED
  piece, so that it matches as one piece when written inside text;
* user-defined pieces that llama.cpp stores with real spaces (the runs of
  spaces) are respelled with ``▁``, as SentencePiece stores them.

Two readers are supported: a path is parsed by a small reader of the GGUF
metadata section in this module (about a second for Gemma 3's 262,144 tokens;
``gguf.GGUFReader`` builds one object per string and takes 15-20 s on the
same file), and an already open ``gguf.GGUFReader`` is read through its
fields. Both give the same result.
"""

import mmap
import os
import struct

import numpy as np

from keras_gemma.checkpoints.atomic_directory import write_cache_file

# llama.cpp token types (gguf.constants.TokenType).
GGUF_NORMAL = 1
GGUF_UNKNOWN = 2
GGUF_CONTROL = 3
GGUF_USER_DEFINED = 4
GGUF_UNUSED = 5
GGUF_BYTE = 6

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
    "general.architecture",
)

# GGUF metadata value types -> numpy dtypes (little-endian). 8 is a string,
# 9 an array; both are handled separately.
_GGUF_SCALAR_DTYPES = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9


class _MetadataParser:
    """Reads key/value pairs from the metadata section of a GGUF file."""

    def __init__(self, buffer, path):
        self.buffer = buffer
        self.path = path
        self.offset = 0

    def _fail(self, what):
        raise ValueError(
            f"{self.path!s} is not a readable GGUF file: {what} at byte {self.offset}."
        )

    def _unpack(self, fmt):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            self._fail("the file ends inside the metadata")
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return values[0] if len(values) == 1 else values

    def string(self):
        length = self._unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            self._fail("a string runs past the end of the file")
        raw = self.buffer[self.offset : end]
        self.offset = end
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a string is not valid UTF-8")

    def value(self, value_type, keep):
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            item_type, count = self._unpack("<IQ")
            return self.array(item_type, count, keep)
        dtype = _GGUF_SCALAR_DTYPES.get(value_type)
        if dtype is None:
            self._fail(f"unknown value type {value_type}")
        value = np.frombuffer(self.buffer, dtype, 1, self.offset)[0]
        self.offset += dtype.itemsize
        return value.item()

    def array(self, item_type, count, keep):
        if item_type in _GGUF_SCALAR_DTYPES:
            dtype = _GGUF_SCALAR_DTYPES[item_type]
            nbytes = dtype.itemsize * count
            if self.offset + nbytes > len(self.buffer):
                self._fail("an array runs past the end of the file")
            values = None
            if keep:
                values = np.frombuffer(self.buffer, dtype, count, self.offset).copy()
            self.offset += nbytes
            return values
        if item_type == _GGUF_STRING:
            if not keep:
                for _ in range(count):
                    (length,) = struct.unpack_from("<Q", self.buffer, self.offset)
                    self.offset += 8 + length
                if self.offset > len(self.buffer):
                    self._fail("a string array runs past the end of the file")
                return None
            return [self.string() for _ in range(count)]
        # Arrays of arrays: read them item by item.
        return [self.value(item_type, keep) for _ in range(count)]


def read_gguf_metadata(path, keys=None):
    """Read the metadata key/value pairs of a GGUF file.

    Args:
        path: path of a ``.gguf`` file.
        keys: optional collection of keys to return; every other value is
            skipped without being decoded. ``None`` returns all of them.

    Returns:
        A dict from key to value: Python scalars and strings, numpy arrays for
        numeric arrays and lists of ``str`` for string arrays.

    Raises:
        ValueError: if the file is not a GGUF file of version 2 or 3.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        try:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as error:  # an empty file cannot be mapped
            raise ValueError(f"{path} is not a GGUF file: it is empty.") from error
    try:
        if buffer[:4] != b"GGUF":
            raise ValueError(
                f"{path} is not a GGUF file: it does not start with the GGUF magic "
                "bytes."
            )
        parser = _MetadataParser(buffer, path)
        parser.offset = 4
        version = parser._unpack("<I")
        if version not in (2, 3):
            raise ValueError(
                f"{path} is a GGUF file of version {version} (or big-endian); only "
                "little-endian GGUF versions 2 and 3 are supported."
            )
        _tensor_count, kv_count = parser._unpack("<QQ")
        metadata = {}
        for _ in range(kv_count):
            key = parser.string()
            value_type = parser._unpack("<I")
            keep = keys is None or key in keys
            value = parser.value(value_type, keep)
            if keep:
                metadata[key] = value
        return metadata
    finally:
        buffer.close()


def _metadata_from_reader(reader, keys):
    """The same dict as `read_gguf_metadata`, from an open `gguf.GGUFReader`."""
    from gguf.constants import GGUFValueType

    metadata = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            item_type = field.types[-1]
            if item_type == GGUFValueType.STRING:
                metadata[key] = [
                    bytes(field.parts[index]).decode("utf-8") for index in field.data
                ]
            else:
                parts = [field.parts[index] for index in field.data]
                metadata[key] = (
                    np.concatenate(parts) if parts else np.zeros((0,), np.float32)
                )
        elif field.types[0] == GGUFValueType.STRING:
            metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            metadata[key] = field.parts[field.data[0]][0].item()
    return metadata


def read_gguf_vocabulary(source):
    """Read the tokenizer metadata of a GGUF file.

    Args:
        source: path of a ``.gguf`` file, or an open ``gguf.GGUFReader``.

    Returns:
        A dict with ``tokens`` (list of str), ``scores`` (float32 array),
        ``token_types`` (int32 array of llama.cpp token types), the special
        ids ``bos_id``, ``eos_id``, ``unk_id``, ``pad_id`` (``None`` when the
        file has no such key), ``add_space_prefix``, ``add_bos_token``,
        ``add_eos_token``, ``model`` (``tokenizer.ggml.model``),
        ``architecture`` and ``chat_template`` (``None`` when absent).

    Raises:
        ValueError: if the file carries no SentencePiece-style vocabulary.
    """
    if hasattr(source, "fields") and hasattr(source, "tensors"):
        metadata = _metadata_from_reader(source, _TOKENIZER_KEYS)
        name = getattr(source, "data", None)
        name = getattr(name, "filename", None) or "the GGUF file"
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"No GGUF file at {os.fspath(source)!r}.")
        metadata = read_gguf_metadata(source, _TOKENIZER_KEYS)
        name = os.fspath(source)
    else:
        raise TypeError(
            "`source` must be a path to a .gguf file or a gguf.GGUFReader; got "
            f"{type(source).__name__}."
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(
            f"{name} holds no vocabulary: the key tokenizer.ggml.tokens is missing."
        )
    model = metadata.get("tokenizer.ggml.model")
    count = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    scores = (
        np.zeros((count,), np.float32)
        if scores is None
        else np.asarray(scores, np.float32)
    )
    types = metadata.get("tokenizer.ggml.token_type")
    types = (
        np.full((count,), GGUF_NORMAL, np.int32)
        if types is None
        else np.asarray(types, np.int32)
    )
    if len(scores) != count or len(types) != count:
        raise ValueError(
            f"{name} has {count} tokens but {len(scores)} scores and {len(types)} "
            "token types; the vocabulary is inconsistent."
        )

    def special(key):
        value = metadata.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return {
        "tokens": list(tokens),
        "scores": scores,
        "token_types": types,
        "bos_id": special("bos_token_id"),
        "eos_id": special("eos_token_id"),
        "unk_id": special("unknown_token_id"),
        "pad_id": special("padding_token_id"),
        "add_space_prefix": bool(metadata.get("tokenizer.ggml.add_space_prefix", 0)),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", 1)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", 0)),
        "model": model,
        "architecture": metadata.get("general.architecture"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def _find(tokens, piece):
    try:
        return tokens.index(piece)
    except ValueError:
        return None


def build_sentencepiece_proto(
    tokens,
    scores,
    token_types,
    *,
    pad_id=None,
    eos_id=None,
    bos_id=None,
    unk_id=None,
    add_dummy_prefix=False,
):
    """Build a serialized SentencePiece ``ModelProto`` from llama.cpp arrays.

    Args:
        tokens: list of token strings, in id order.
        scores: the score of each token (used as BPE merge priority).
        token_types: the llama.cpp type of each token (1 normal, 2 unknown,
            3 control, 4 user-defined, 5 unused, 6 byte).
        pad_id, eos_id, bos_id, unk_id: ids of the special tokens. ``None``
            looks them up by Gemma's names (``<pad>``, ``<eos>``, ``<bos>``,
            ``<unk>``); a missing ``<unk>`` is an error since SentencePiece
            requires one.
        add_dummy_prefix: whether SentencePiece prepends a space to the text
            (Gemma: no).

    Returns:
        The serialized model, as ``bytes``.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    tokens = list(tokens)
    scores = np.asarray(scores, np.float32)
    token_types = np.asarray(token_types, np.int32)
    if not (len(tokens) == len(scores) == len(token_types)):
        raise ValueError(
            f"`tokens`, `scores` and `token_types` must have the same length; got "
            f"{len(tokens)}, {len(scores)} and {len(token_types)}."
        )
    pad_id = _find(tokens, "<pad>") if pad_id is None else pad_id
    eos_id = _find(tokens, "<eos>") if eos_id is None else eos_id
    bos_id = _find(tokens, "<bos>") if bos_id is None else bos_id
    if unk_id is None:
        unk_id = _find(tokens, "<unk>")
        if unk_id is None:
            unknown = np.flatnonzero(token_types == GGUF_UNKNOWN)
            unk_id = int(unknown[0]) if len(unknown) else None
    if unk_id is None:
        raise ValueError(
            "The vocabulary has no unknown token (no `<unk>` piece and no token "
            "of type UNKNOWN); a SentencePiece model needs one."
        )
    sequence_controls = {i for i in (pad_id, eos_id, bos_id) if i is not None}

    Piece = model_pb2.ModelProto.SentencePiece
    model = model_pb2.ModelProto()
    seen = {}
    has_bytes = False
    for index, (token, score, token_type) in enumerate(
        zip(tokens, scores.tolist(), token_types.tolist())
    ):
        if index == unk_id:
            piece_type = Piece.UNKNOWN
        elif index in sequence_controls:
            piece_type = Piece.CONTROL
        elif token_type == GGUF_BYTE:
            piece_type = Piece.BYTE
            has_bytes = True
        elif token_type in (GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNKNOWN):
            piece_type = Piece.USER_DEFINED
        elif token_type == GGUF_UNUSED:
            piece_type = Piece.UNUSED
        else:
            piece_type = Piece.NORMAL
        if piece_type != Piece.BYTE:
            # SentencePiece stores pieces in their normalized form, where a
            # space is "▁"; llama.cpp writes some user-defined pieces (runs of
            # spaces) with real spaces.
            token = token.replace(" ", "\u2581")
        if not token:
            raise ValueError(f"Token {index} is the empty string.")
        if token in seen:
            raise ValueError(
                f"Tokens {seen[token]} and {index} are both {token!r} once spaces "
                "are written as '▁'; the vocabulary cannot be a SentencePiece model."
            )
        seen[token] = index
        piece = model.pieces.add()
        piece.piece = token
        piece.score = score
        piece.type = piece_type

    trainer = model.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = has_bytes
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id = unk_id
    trainer.unk_piece = tokens[unk_id]
    trainer.bos_id = -1 if bos_id is None else bos_id
    trainer.eos_id = -1 if eos_id is None else eos_id
    trainer.pad_id = -1 if pad_id is None else pad_id
    if bos_id is not None:
        trainer.bos_piece = tokens[bos_id]
    if eos_id is not None:
        trainer.eos_piece = tokens[eos_id]
    if pad_id is not None:
        trainer.pad_piece = tokens[pad_id]

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.precompiled_charsmap = b""
    normalizer.add_dummy_prefix = bool(add_dummy_prefix)
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def gguf_to_sentencepiece_proto(source):
    """Rebuild the SentencePiece model of a GGUF file's vocabulary.

    Args:
        source: path of a ``.gguf`` file, or an open ``gguf.GGUFReader``.

    Returns:
        The serialized SentencePiece ``ModelProto`` (``bytes``), ready for
        ``GemmaTokenizer(proto=...)``.

    Raises:
        ValueError: if the file holds no vocabulary, or one that is not a
            SentencePiece vocabulary (``tokenizer.ggml.model`` other than
            ``llama``).
    """
    vocab = read_gguf_vocabulary(source)
    if vocab["model"] not in (None, "llama"):
        raise ValueError(
            f"The GGUF vocabulary is of type {vocab['model']!r}; only SentencePiece "
            "vocabularies (tokenizer.ggml.model = 'llama'), as Gemma uses, can be "
            "rebuilt into a SentencePiece model."
        )
    return build_sentencepiece_proto(
        vocab["tokens"],
        vocab["scores"],
        vocab["token_types"],
        pad_id=vocab["pad_id"],
        eos_id=vocab["eos_id"],
        bos_id=vocab["bos_id"],
        unk_id=vocab["unk_id"],
        add_dummy_prefix=vocab["add_space_prefix"],
    )


def cached_sentencepiece_proto(path):
    """`gguf_to_sentencepiece_proto(path)`, kept beside the GGUF file.

    Rebuilding the 262,144-piece Gemma vocabulary takes seconds of Python;
    the result is written next to the file as
    `<name>.<size>-<mtime>.tokenizer.model` (so a changed file gets a new
    one) and read back on later loads. The write is atomic, and a directory
    that cannot be written to only means no cache.

    Example:

    ```python
    proto = cached_sentencepiece_proto("gemma-3-270m-q4_k_m.gguf")
    ```
    """
    status = os.stat(path)
    cache = f"{path}.{status.st_size}-{status.st_mtime_ns}.tokenizer.model"
    try:
        with open(cache, "rb") as file:
            return file.read()
    except OSError:
        pass
    proto = gguf_to_sentencepiece_proto(path)
    write_cache_file(cache, proto)
    return proto
