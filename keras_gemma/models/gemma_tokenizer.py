"""Gemma's SentencePiece tokenizer, eager (sentencepiece) and in tf.data (TF Text)."""

import base64
import functools
import numbers
import os
import re
import sys

import keras
import numpy as np

from keras_gemma.checkpoints import garbage_collection

# The special pieces of the Gemma vocabularies, by the property that exposes
# their id. Absent pieces give `None`.
_NAMED_TOKENS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "mask": "<mask>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
    "fim_prefix": "<|fim_prefix|>",
    "fim_middle": "<|fim_middle|>",
    "fim_suffix": "<|fim_suffix|>",
    "file_separator": "<|file_separator|>",
    "start_of_image": "<start_of_image>",
    "end_of_image": "<end_of_image>",
    "image_soft_token": "<image_soft_token>",
}
_REQUIRED_TOKENS = ("pad", "eos", "bos")
# User-defined pieces of the Gemma vocabularies that are control tokens (and
# so are dropped by `skip_special_tokens=True`), besides the CONTROL and
# UNKNOWN pieces of the model.
_CONTROL_PIECES = frozenset(_NAMED_TOKENS.values()) | {"[multimodal]", "[@BOS@]"}
_UNUSED_PIECE = re.compile(r"<unused\d+>\Z")


class _Tables:
    """Lookup tables of a vocabulary, each built on first use (a plain
    object, not tracked by Keras).

    Building them all took 0.2 s of every tokenizer load for the 262,144
    pieces of Gemma 3 (a Python loop over the pieces): most programs only
    tokenize and decode, which need none of them.
    """

    def __init__(self, processor, types, token_ids):
        self._processor = processor
        self._types = types  # each piece's SentencePiece type, in id order
        self.token_ids = token_ids
        self.size = processor.get_piece_size()

    @functools.cached_property
    def pieces(self):
        return tuple(self._processor.id_to_piece(list(range(self.size))))

    @functools.cached_property
    def piece_ids(self):
        return dict(zip(self.pieces, range(self.size)))

    @functools.cached_property
    def special_ids(self):
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        piece_type = model_pb2.ModelProto.SentencePiece
        control_types = (piece_type.CONTROL, piece_type.UNKNOWN)
        return tuple(
            i
            for i, (piece, kind) in enumerate(zip(self.pieces, self._types))
            if kind in control_types
            or piece in _CONTROL_PIECES
            or (piece[:1] == "<" and _UNUSED_PIECE.match(piece))
        )

    @functools.cached_property
    def special_mask(self):
        mask = np.zeros((self.size,), bool)
        mask[list(self.special_ids)] = True
        return mask


def _tf():
    """TensorFlow, imported on first use only (never at package import)."""
    import tensorflow as tf

    return tf


def _is_tf_tensor(value):
    """True for a tf.Tensor / tf.RaggedTensor, without importing TensorFlow."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not hasattr(tf, "is_tensor"):
        return False
    return bool(tf.is_tensor(value))


def _to_numpy_if_backend_tensor(value):
    """Converts a JAX array / torch tensor to numpy; other values unchanged."""
    if isinstance(value, (np.ndarray, list, tuple, str, bytes, numbers.Number)):
        return value
    if keras.ops.is_tensor(value) or hasattr(value, "__array__"):
        return np.asarray(keras.ops.convert_to_numpy(value))
    return value


def _read_proto(proto):
    """Returns the serialized model for a path, bytes or a ModelProto."""
    if proto is None:
        raise TypeError(
            "`proto` is required: pass the path of a SentencePiece model file "
            "(e.g. 'tokenizer.model') or its bytes, or use "
            "`GemmaTokenizer.from_preset(...)`."
        )
    if isinstance(proto, (bytes, bytearray, memoryview)):
        return bytes(proto)
    if isinstance(proto, (str, os.PathLike)):
        path = os.fspath(proto)
        if not os.path.isfile(path):
            raise ValueError(
                f"`proto` must be a SentencePiece model file or its bytes; there is "
                f"no file at {path!r}."
            )
        with open(path, "rb") as handle:
            return handle.read()
    if hasattr(proto, "SerializeToString") and hasattr(proto, "pieces"):
        return proto.SerializeToString()
    raise TypeError(
        "`proto` must be a path to a SentencePiece model, its bytes or a "
        f"sentencepiece ModelProto; got {type(proto).__name__}."
    )


def _parse_proto(data):
    """Parses and checks a serialized SentencePiece model."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"`proto` is not a SentencePiece model: the bytes do not parse ({error})."
        ) from error
    if len(model.pieces) == 0:
        raise ValueError(
            "`proto` is not a SentencePiece model: it holds no vocabulary pieces."
        )
    return model


def _piece_id(processor, piece):
    """The id of `piece` in `processor`'s vocabulary, or `None`."""
    token_id = processor.piece_to_id(piece)
    return token_id if processor.id_to_piece(token_id) == piece else None


def _encoder_proto(model, types):
    """The model the tokenizer runs: control pieces match literally in text.

    SentencePiece never produces a CONTROL piece (`<bos>`, `<eos>`, `<pad>`)
    from text; the reference (transformers) treats them as special added
    tokens that match when written in text. Turning them into USER_DEFINED
    pieces gives the reference's ids, and makes `detokenize` spell them out
    (as transformers' `decode` does) so that decoding inverts encoding.
    `types` holds each piece's type, read once (reading a field of one of
    262k pieces costs about half a microsecond).
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    piece_type = model_pb2.ModelProto.SentencePiece
    encoder = model_pb2.ModelProto()
    encoder.CopyFrom(model)
    for index, kind in enumerate(types):
        if kind == piece_type.CONTROL:
            encoder.pieces[index].type = piece_type.USER_DEFINED
        elif kind == piece_type.UNKNOWN:
            encoder.trainer_spec.unk_surface = encoder.pieces[index].piece
    return encoder.SerializeToString()


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(keras.layers.Layer):
    """Gemma's SentencePiece tokenizer.

    Tokenizes strings into ids and back with a SentencePiece model: Gemma 1, 2
    and 3 (and CodeGemma) vocabularies, from a `tokenizer.model`, a keras-hub
    `vocabulary.spm`, or a GGUF file (see `from_preset`).

    Eagerly (strings, lists of strings, numpy arrays, eager `tf.Tensor`s)
    it runs the `sentencepiece` package and needs no TensorFlow. Inside a
    TensorFlow graph (`tf.data.Dataset.map`, `tf.function`) it runs
    TensorFlow Text on the same model, which gives the same ids. TensorFlow
    is imported only when a `tf.Tensor` is passed.

    Control tokens written literally in text (`<start_of_turn>`,
    `<end_of_turn>`, `<bos>`, `<eos>`, `<pad>`, `<unusedN>`, ...) become one
    token, as in transformers' Gemma tokenizer (a literal `<unk>` does not:
    SentencePiece keeps the unknown piece out of text matching).
    `detokenize` writes every token out (`<bos>` included) unless
    `skip_special_tokens=True`, so `detokenize(tokenize(text)) == text`.

    Args:
        proto: the SentencePiece model: a path to the file, its bytes, or a
            `sentencepiece_model_pb2.ModelProto`.
        **kwargs: passed to `keras.layers.Layer` (for example `name`).

    Calling the layer is the same as `tokenize(inputs)`. `get_config()`
    carries the model (base64), so a saved tokenizer reloads without the
    original file.

    Example (`tokenizer.model` is any Gemma SentencePiece model):

    ```python
    tokenizer = GemmaTokenizer(proto="tokenizer.model")
    ids = tokenizer.tokenize("Hello")  # a list of ints
    assert tokenizer.detokenize(ids) == "Hello"
    batch = tokenizer.tokenize(["a b", "c"])  # a list of lists of ints
    assert tokenizer.detokenize(batch) == ["a b", "c"]
    assert tokenizer.tokenize("Hi", add_bos=True)[0] == tokenizer.bos_token_id
    assert tokenizer.tokenize("") == []
    turn = tokenizer.tokenize("<start_of_turn>user")
    assert turn[0] == tokenizer.start_of_turn_token_id

    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(["a b", "c"]).batch(2).map(tokenizer)
    assert next(iter(ds)).to_list() == batch  # a tf.RaggedTensor
    ```
    """

    def __init__(self, proto, **kwargs):
        super().__init__(**kwargs)
        # Strings in, lists or ragged tensors out: no conversion to backend
        # tensors, nothing to build.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        with garbage_collection.paused():
            self._load_vocabulary(_read_proto(proto))

    def _load_vocabulary(self, data):
        import sentencepiece

        model = _parse_proto(data)
        types = [piece.type for piece in model.pieces]
        encoder_bytes = _encoder_proto(model, types)
        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=encoder_bytes)
        except (RuntimeError, OSError) as error:
            raise ValueError(
                f"`proto` is not a usable SentencePiece model: {error}"
            ) from error

        token_ids = {
            name: _piece_id(processor, piece) for name, piece in _NAMED_TOKENS.items()
        }
        token_ids["unk"] = processor.unk_id()
        missing = [
            _NAMED_TOKENS[name] for name in _REQUIRED_TOKENS if token_ids[name] is None
        ]
        if missing:
            raise ValueError(
                "`proto` is not a Gemma vocabulary: it has no "
                + ", ".join(missing)
                + " piece."
            )
        self._proto_bytes = data
        self._encoder_bytes = encoder_bytes
        self._sp = processor
        self._tables = _Tables(processor, types, token_ids)

    # ------------------------------------------------------------------ config

    def get_config(self):
        config = super().get_config()
        config["proto"] = base64.b64encode(self._proto_bytes).decode("ascii")
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        proto = config.pop("proto", None)
        if isinstance(proto, str):
            proto = base64.b64decode(proto.encode("ascii"))
        return cls(proto=proto, **config)

    @property
    def proto(self):
        """The serialized SentencePiece model (`bytes`) the tokenizer was built
        from."""
        return self._proto_bytes

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Loads the vocabulary of a checkpoint.

        Args:
            preset: a built-in preset name, a keras-gemma preset directory, a
                transformers directory (`tokenizer.model`), a keras-hub
                (Kaggle) preset directory, a `.gguf` file (its vocabulary is
                rebuilt into a SentencePiece model), a SentencePiece model
                file (`.model`, `.spm`), `hf://owner/name` or
                `kaggle://owner/model/keras/variation`.
            **kwargs: passed to the constructor.
        """
        from keras_gemma.checkpoints.preset_loading import load_tokenizer

        return load_tokenizer(preset, **kwargs)

    def save_to_preset(self, directory):
        """Writes the vocabulary into a keras-gemma preset directory."""
        from keras_gemma.checkpoints.preset_loading import save_to_preset

        return save_to_preset(self, directory)

    # -------------------------------------------------------------- vocabulary

    def vocabulary_size(self):
        """The number of pieces in the vocabulary."""
        return self._tables.size

    def get_vocabulary(self):
        """All pieces, in id order, as SentencePiece spells them (`▁` for a
        space)."""
        return list(self._tables.pieces)

    def id_to_token(self, id):
        """The piece of an id. Raises `ValueError` for an id outside the
        vocabulary."""
        if isinstance(id, bool) or not isinstance(id, numbers.Integral):
            raise TypeError(f"`id` must be an int; got {type(id).__name__}.")
        if not 0 <= id < self._tables.size:
            raise ValueError(
                f"`id` {int(id)} is outside the vocabulary (ids 0 to "
                f"{self._tables.size - 1})."
            )
        return self._tables.pieces[int(id)]

    def token_to_id(self, token):
        """The id of a piece (as `get_vocabulary` spells it). Raises
        `ValueError` for a piece not in the vocabulary."""
        if not isinstance(token, str):
            raise TypeError(f"`token` must be a str; got {type(token).__name__}.")
        if token not in self._tables.piece_ids:
            raise ValueError(
                f"`token` {token!r} is not in the vocabulary (SentencePiece writes "
                "a space as '▁')."
            )
        return self._tables.piece_ids[token]

    @property
    def special_token_ids(self):
        """Ids of the control tokens (`<pad>`, `<bos>`, `<eos>`, `<unk>`,
        `<start_of_turn>`, `<end_of_turn>`, `<unusedN>`, image and
        fill-in-the-middle tokens, ...): the tokens `skip_special_tokens`
        drops."""
        return self._tables.special_ids

    def _named_id(self, name):
        return self._tables.token_ids[name]

    pad_token_id = property(lambda self: self._named_id("pad"), doc="`<pad>` id.")
    eos_token_id = property(lambda self: self._named_id("eos"), doc="`<eos>` id.")
    bos_token_id = property(lambda self: self._named_id("bos"), doc="`<bos>` id.")
    unk_token_id = property(lambda self: self._named_id("unk"), doc="`<unk>` id.")
    mask_token_id = property(
        lambda self: self._named_id("mask"), doc="`<mask>` id, or None."
    )
    start_of_turn_token_id = property(
        lambda self: self._named_id("start_of_turn"),
        doc="`<start_of_turn>` id, or None.",
    )
    end_of_turn_token_id = property(
        lambda self: self._named_id("end_of_turn"), doc="`<end_of_turn>` id, or None."
    )
    fim_prefix_token_id = property(
        lambda self: self._named_id("fim_prefix"), doc="`<|fim_prefix|>` id, or None."
    )
    fim_middle_token_id = property(
        lambda self: self._named_id("fim_middle"), doc="`<|fim_middle|>` id, or None."
    )
    fim_suffix_token_id = property(
        lambda self: self._named_id("fim_suffix"), doc="`<|fim_suffix|>` id, or None."
    )
    file_separator_token_id = property(
        lambda self: self._named_id("file_separator"),
        doc="`<|file_separator|>` id, or None.",
    )
    start_of_image_token_id = property(
        lambda self: self._named_id("start_of_image"),
        doc="`<start_of_image>` id, or None.",
    )
    end_of_image_token_id = property(
        lambda self: self._named_id("end_of_image"),
        doc="`<end_of_image>` id, or None.",
    )

    def _piece_or_none(self, name):
        token_id = self._tables.token_ids[name]
        return None if token_id is None else self._tables.pieces[token_id]

    pad_token = property(lambda self: self._piece_or_none("pad"))
    eos_token = property(lambda self: self._piece_or_none("eos"))
    bos_token = property(lambda self: self._piece_or_none("bos"))
    unk_token = property(lambda self: self._piece_or_none("unk"))
    mask_token = property(lambda self: self._piece_or_none("mask"))
    start_of_turn_token = property(lambda self: self._piece_or_none("start_of_turn"))
    end_of_turn_token = property(lambda self: self._piece_or_none("end_of_turn"))
    fim_prefix_token = property(lambda self: self._piece_or_none("fim_prefix"))
    fim_middle_token = property(lambda self: self._piece_or_none("fim_middle"))
    fim_suffix_token = property(lambda self: self._piece_or_none("fim_suffix"))
    file_separator_token = property(lambda self: self._piece_or_none("file_separator"))
    start_of_image_token = property(lambda self: self._piece_or_none("start_of_image"))
    end_of_image_token = property(lambda self: self._piece_or_none("end_of_image"))

    # keras-hub's names for the sequence delimiters.
    start_token_id = property(lambda self: self._named_id("bos"), doc="`<bos>` id.")
    end_token_id = property(lambda self: self._named_id("eos"), doc="`<eos>` id.")

    # -------------------------------------------------------------- tokenize

    def call(self, inputs):
        return self.tokenize(inputs)

    def tokenize(self, inputs, add_bos=False, add_eos=False):
        """Text to token ids.

        Args:
            inputs: a `str` (or UTF-8 `bytes`), a list/tuple of them, a numpy
                array of strings, or a string `tf.Tensor` (rank 0 or 1).
            add_bos: prepend `<bos>`.
            add_eos: append `<eos>`.

        Returns:
            For a string, a list of ints; for a list or a numpy array of
            strings, a list of lists of ints (nested like the array); for a
            `tf.Tensor`, an int32 `tf.Tensor` (scalar input) or
            `tf.RaggedTensor` (vector input). The empty string gives no ids
            (only `<bos>` / `<eos>` when asked).

        Raises:
            TypeError: for anything that is not text (None, numbers, ...).
        """
        if _is_tf_tensor(inputs):
            return self._tf_tokenize(inputs, add_bos, add_eos)
        prefix = [self.bos_token_id] if add_bos else []
        suffix = [self.eos_token_id] if add_eos else []
        if isinstance(inputs, (str, bytes)):
            text = _as_text(inputs, "inputs")
            return prefix + self._sp.encode(text) + suffix
        if isinstance(inputs, np.ndarray):
            if inputs.dtype.kind not in "USO":
                raise TypeError(
                    "`inputs` must hold strings; got a numpy array of dtype "
                    f"{inputs.dtype}."
                )
            if inputs.ndim == 0:
                return self.tokenize(inputs.item(), add_bos, add_eos)
            if inputs.ndim > 1:
                return [self.tokenize(row, add_bos, add_eos) for row in inputs]
            inputs = inputs.tolist()
        if isinstance(inputs, (list, tuple)):
            texts = [_as_text(text, f"inputs[{i}]") for i, text in enumerate(inputs)]
            if not texts:
                return []
            return [prefix + ids + suffix for ids in self._sp.encode(texts)]
        raise TypeError(
            "`inputs` must be a string, a list of strings, a numpy array of "
            f"strings or a string tf.Tensor; got {_describe(inputs)}."
        )

    def detokenize(self, inputs, skip_special_tokens=False):
        """Token ids to text.

        Args:
            inputs: a sequence of ids (list of ints, 1-D array) or a batch of
                them (list of lists, 2-D array, `tf.RaggedTensor`). JAX arrays
                and torch tensors are accepted too.
            skip_special_tokens: drop the ids in `special_token_ids` (pad,
                bos, eos, unk, turn markers, ...) before decoding.

        Returns:
            A `str` for one sequence, a list of `str` for a batch; for a
            `tf.Tensor` input, a string `tf.Tensor`.

        Raises:
            TypeError: for ids that are not integers.
            ValueError: for ids outside `[0, vocabulary_size())`.
        """
        if _is_tf_tensor(inputs):
            return self._tf_detokenize(inputs, skip_special_tokens)
        inputs = _to_numpy_if_backend_tensor(inputs)
        if isinstance(inputs, np.ndarray):
            if inputs.dtype.kind not in "iu":
                raise TypeError(
                    "`inputs` must hold integer token ids; got a numpy array of "
                    f"dtype {inputs.dtype}."
                )
            if inputs.ndim == 0:
                inputs = inputs.reshape((1,))
            if inputs.ndim > 2:
                return [self.detokenize(row, skip_special_tokens) for row in inputs]
            self._check_ids(inputs)
            if inputs.ndim == 1:
                return self._decode([inputs.tolist()], skip_special_tokens)[0]
            return self._decode(inputs.tolist(), skip_special_tokens)
        if isinstance(inputs, numbers.Integral) and not isinstance(inputs, bool):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(
                "`inputs` must be token ids: a list of ints, a list of lists of "
                f"ints, an integer array or tensor; got {_describe(inputs)}."
            )
        if all(_is_int(i) for i in inputs):
            sequence = [int(i) for i in inputs]
            self._check_ids(np.asarray(sequence, np.int64))
            return self._decode([sequence], skip_special_tokens)[0]
        batch = []
        for row_index, row in enumerate(inputs):
            row = _to_numpy_if_backend_tensor(row)
            if isinstance(row, np.ndarray):
                if row.dtype.kind not in "iu" or row.ndim != 1:
                    raise TypeError(
                        f"`inputs[{row_index}]` must be a sequence of integer ids; "
                        f"got an array of dtype {row.dtype} and rank {row.ndim}."
                    )
                row = row.tolist()
            if not isinstance(row, (list, tuple)) or not all(_is_int(i) for i in row):
                raise TypeError(
                    f"`inputs[{row_index}]` must be a sequence of integer ids; got "
                    f"{_describe(row)}."
                )
            row = [int(i) for i in row]
            self._check_ids(np.asarray(row, np.int64))
            batch.append(row)
        return self._decode(batch, skip_special_tokens)

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        size = self._tables.size
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(
                f"Token id {bad} is outside the vocabulary: ids must be in [0, "
                f"{size - 1}]."
            )

    def _decode(self, batch, skip_special_tokens):
        if skip_special_tokens:
            mask = self._tables.special_mask
            batch = [[i for i in row if not mask[i]] for row in batch]
        return self._sp.decode(batch)

    # ---------------------------------------------------------- TensorFlow

    def _tf_tokenizer(self):
        """A TF Text tokenizer on the same model, made in the graph being traced.

        It is not kept between calls: TensorFlow frees a resource made once
        in the eager context when its kernel cache is cleared (setting the
        global seed does that), while one made inside a traced function lives
        as long as the function.
        """
        tf = _tf()
        import tensorflow_text

        return tensorflow_text.SentencepieceTokenizer(
            model=self._encoder_bytes, out_type=tf.int32
        )

    def _tf_tokenize(self, inputs, add_bos, add_eos):
        tf = _tf()
        if isinstance(inputs, tf.RaggedTensor) or inputs.dtype != tf.string:
            raise TypeError(
                "`inputs` must be a dense tf.string tensor; got "
                f"{type(inputs).__name__} of dtype {inputs.dtype.name}."
            )
        rank = inputs.shape.rank
        if rank is None or rank > 1:
            raise ValueError(
                "`inputs` must be a scalar or a vector of strings; got a tensor of "
                f"shape {inputs.shape}."
            )
        if tf.executing_eagerly():
            # Eager tensors go through the sentencepiece package, as lists do.
            if rank == 0:
                ids = self.tokenize(inputs.numpy(), add_bos, add_eos)
                return tf.constant(ids, tf.int32, shape=[len(ids)])
            rows = self.tokenize(list(inputs.numpy()), add_bos, add_eos)
            values = np.array([i for row in rows for i in row], np.int32)
            lengths = np.array([len(row) for row in rows], np.int64)
            return tf.RaggedTensor.from_row_lengths(values, lengths)
        ids = self._tf_tokenizer().tokenize(inputs)
        if rank == 0:
            parts = []
            if add_bos:
                parts.append(tf.constant([self.bos_token_id], tf.int32))
            parts.append(ids)
            if add_eos:
                parts.append(tf.constant([self.eos_token_id], tf.int32))
            return tf.concat(parts, axis=0) if len(parts) > 1 else ids
        parts = []
        rows = ids.nrows(out_type=tf.int64)
        if add_bos:
            parts.append(_tf_column(tf, rows, self.bos_token_id))
        parts.append(ids)
        if add_eos:
            parts.append(_tf_column(tf, rows, self.eos_token_id))
        return tf.concat(parts, axis=1) if len(parts) > 1 else ids

    def _tf_detokenize(self, inputs, skip_special_tokens):
        tf = _tf()
        if not inputs.dtype.is_integer:
            raise TypeError(
                f"`inputs` must hold integer token ids; got dtype {inputs.dtype.name}."
            )
        if tf.executing_eagerly():
            if isinstance(inputs, tf.RaggedTensor):
                ids = inputs.to_list()
            else:
                ids = inputs.numpy()
            return tf.constant(self.detokenize(ids, skip_special_tokens), tf.string)
        ids = tf.cast(inputs, tf.int32)
        size = self._tables.size
        values = ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids
        message = f"token ids must be in [0, {size - 1}]"
        checks = [
            tf.debugging.assert_non_negative(values, message=message),
            tf.debugging.assert_less(values, size, message=message),
        ]
        with tf.control_dependencies(checks):
            ids = tf.identity(ids) if not isinstance(ids, tf.RaggedTensor) else ids
            if isinstance(ids, tf.RaggedTensor):
                ids = ids.with_flat_values(tf.identity(ids.flat_values))
            if skip_special_tokens:
                special = tf.constant(self._tables.special_mask)
                if not isinstance(ids, tf.RaggedTensor) and ids.shape.rank == 1:
                    ids = tf.boolean_mask(ids, ~tf.gather(special, ids))
                else:
                    if not isinstance(ids, tf.RaggedTensor):
                        ids = tf.RaggedTensor.from_tensor(ids)
                    keep = tf.ragged.map_flat_values(
                        lambda v: ~tf.gather(special, v), ids
                    )
                    ids = tf.ragged.boolean_mask(ids, keep)
            return self._tf_tokenizer().detokenize(ids)


def _tf_column(tf, rows, value):
    column = tf.fill(tf.stack([rows, tf.constant(1, tf.int64)]), value)
    return tf.RaggedTensor.from_tensor(tf.cast(column, tf.int32))


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value):
    if value is None:
        return "None"
    return f"a value of type {type(value).__name__}"


def _as_text(value, name):
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"`{name}` is bytes but not valid UTF-8.") from error
    raise TypeError(f"`{name}` must be a string; got {_describe(value)}.")
