"""Strings to model inputs (and back) for Gemma causal language modelling."""

from collections.abc import Mapping

import keras
import numpy as np

from keras_gemma.chat import chat_segments
from keras_gemma.models.gemma_tokenizer import (
    GemmaTokenizer,
    _is_tf_tensor,
    _tf,
    _tf_column,
    _to_numpy_if_backend_tensor,
)


def _check_length(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int; got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value}.")
    return int(value)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(keras.layers.Layer):
    """Turns text into the inputs, labels and weights of a Gemma causal LM.

    Calling the layer on strings gives ``(x, y, sample_weight)`` for `fit`:

    - ``x["token_ids"]``: int32, shape ``(batch, sequence_length)``: `<bos>`
      (if `add_start_token`), the text's tokens, `<eos>` (if
      `add_end_token`), truncated on the right and right-padded with `<pad>`;
    - ``x["padding_mask"]``: **bool**, same shape, True on real tokens;
    - ``y``: int32, the same sequence shifted left by one (the next token at
      each position);
    - ``sample_weight``: float32 (0 or 1), the padding mask shifted left
      likewise.

    The text is packed to ``sequence_length + 1`` tokens before the shift, so
    every position of ``token_ids`` has its next token in ``y``. A text that
    does not fit is cut and loses its `<eos>`. A text that already starts with
    a literal ``<bos>`` (as `render_chat` writes) gets no second one.

    The inputs can be a string (outputs without a batch axis), a list or
    numpy array of strings (numpy outputs, any backend, no TensorFlow
    needed), or a string `tf.Tensor` inside `tf.data.Dataset.map` (TensorFlow
    outputs).

    For generation, `generate_preprocess` packs prompts (start token, no end
    token) and `generate_postprocess` turns ids back into text without the
    control tokens. For chat fine-tuning, `chat_preprocess` packs
    conversations with loss on the model's turns only.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: length of the packed sequences.
        add_start_token: start each sequence with `<bos>`.
        add_end_token: end each sequence with `<eos>` (in `call` only).
        **kwargs: passed to `keras.layers.Layer`.

    Example (`tokenizer.model` is any Gemma SentencePiece model):

    ```python
    tokenizer = GemmaTokenizer(proto="tokenizer.model")
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sample_weight = preprocessor(["Hello world", "Hi"])
    assert x["token_ids"].shape == (2, 8) and x["padding_mask"].dtype == bool
    assert (y[:, :-1] == x["token_ids"][:, 1:]).all()

    prompts = preprocessor.generate_preprocess(["Hello"])
    assert preprocessor.generate_postprocess(prompts) == ["Hello"]

    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices(["Hello world", "Hi"])
    ds = ds.batch(2).map(preprocessor)  # ready for model.fit(ds)
    ```
    """

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        if not isinstance(tokenizer, GemmaTokenizer):
            raise TypeError(
                "`tokenizer` must be a GemmaTokenizer; got "
                f"{type(tokenizer).__name__}. Build one with "
                "GemmaTokenizer(proto=...) or GemmaTokenizer.from_preset(...)."
            )
        self.tokenizer = tokenizer
        self.sequence_length = _check_length(sequence_length, "sequence_length")
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
                "sequence_length": self.sequence_length,
                "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        tokenizer = config.pop("tokenizer")
        if isinstance(tokenizer, dict):
            tokenizer = keras.saving.deserialize_keras_object(tokenizer)
        return cls(tokenizer=tokenizer, **config)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """A preprocessor on the vocabulary of a checkpoint (see
        `GemmaTokenizer.from_preset` for the accepted forms)."""
        from keras_gemma.checkpoints.preset_loading import load_preprocessor

        return load_preprocessor(preset, **kwargs)

    def save_to_preset(self, directory):
        """Writes the tokenizer and packing settings into a preset directory."""
        from keras_gemma.checkpoints.preset_loading import save_to_preset

        return save_to_preset(self, directory)

    # ------------------------------------------------------------- packing

    def _with_specials(self, ids, add_start, add_end):
        bos = self.tokenizer.bos_token_id
        if add_start and not (ids and ids[0] == bos):
            ids = [bos] + ids
        if add_end:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def _pack_numpy(self, rows, length):
        token_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), bool)
        for index, row in enumerate(rows):
            row = row[:length]
            token_ids[index, : len(row)] = row
            mask[index, : len(row)] = True
        return token_ids, mask

    def _pack_tf(self, ids, length, add_start, add_end):
        """Ragged ids (batch, None) to dense (batch, length) ids and mask."""
        tf = _tf()
        rows = ids.nrows(out_type=tf.int64)
        if add_start:
            bos = self.tokenizer.bos_token_id
            positions = tf.ragged.range(ids.row_lengths())
            leading_bos = tf.logical_and(
                tf.equal(positions, 0), tf.equal(ids, tf.constant(bos, ids.dtype))
            )
            ids = tf.ragged.boolean_mask(ids, tf.logical_not(leading_bos))
            ids = tf.concat([_tf_column(tf, rows, bos), ids], axis=1)
        if add_end:
            ids = tf.concat(
                [ids, _tf_column(tf, rows, self.tokenizer.eos_token_id)], axis=1
            )
        ids = ids[:, :length]
        shape = [None, length]
        token_ids = ids.to_tensor(
            default_value=self.tokenizer.pad_token_id, shape=shape
        )
        mask = tf.ones_like(ids, dtype=tf.bool).to_tensor(
            default_value=False, shape=shape
        )
        return token_ids, mask

    def _tokenize_batch(self, x):
        """Returns (ids, batched, is_tf) for text inputs."""
        if _is_tf_tensor(x):
            tf = _tf()
            if x.shape.rank == 0:
                return self.tokenizer.tokenize(tf.reshape(x, [1])), False, True
            return self.tokenizer.tokenize(x), True, True
        if isinstance(x, (str, bytes)) or (isinstance(x, np.ndarray) and x.ndim == 0):
            return [self.tokenizer.tokenize(x)], False, False
        if isinstance(x, np.ndarray) and x.ndim != 1:
            raise ValueError(
                "`x` must be a string or a 1-D batch of strings; got an array of "
                f"shape {x.shape}."
            )
        if isinstance(x, (list, tuple, np.ndarray)):
            return self.tokenizer.tokenize(x), True, False
        raise TypeError(
            "`x` must be a string, a list of strings, a numpy array of strings or "
            f"a string tf.Tensor; got {'None' if x is None else type(x).__name__}."
        )

    def _pack(self, x, length, add_start, add_end):
        ids, batched, is_tf = self._tokenize_batch(x)
        if is_tf:
            token_ids, mask = self._pack_tf(ids, length, add_start, add_end)
        else:
            rows = [self._with_specials(row, add_start, add_end) for row in ids]
            token_ids, mask = self._pack_numpy(rows, length)
        return token_ids, mask, batched, is_tf

    # ---------------------------------------------------------------- fit

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        """Packs text for `fit`.

        Args:
            x: a string, a list / numpy array of strings, or a string
                `tf.Tensor` (rank 0 or 1).
            y, sample_weight: must be None: the labels come from `x`.
            sequence_length: overrides `self.sequence_length`.

        Returns:
            ``({"token_ids", "padding_mask"}, labels, sample_weight)``.
        """
        if y is not None or sample_weight is not None:
            raise ValueError(
                "GemmaCausalLMPreprocessor computes the labels and sample weights "
                "from `x` (the next token at each position); pass only `x`, not "
                "`y` or `sample_weight`."
            )
        length = _check_length(
            self.sequence_length if sequence_length is None else sequence_length,
            "sequence_length",
        )
        token_ids, mask, batched, is_tf = self._pack(
            x, length + 1, self.add_start_token, self.add_end_token
        )
        if is_tf:
            tf = _tf()
            weights = tf.cast(mask[:, 1:], tf.float32)
        else:
            weights = mask[:, 1:].astype(np.float32)
        inputs = {"token_ids": token_ids[:, :-1], "padding_mask": mask[:, :-1]}
        labels = token_ids[:, 1:]
        if not batched:
            inputs = {key: value[0] for key, value in inputs.items()}
            labels, weights = labels[0], weights[0]
        return inputs, labels, weights

    # ---------------------------------------------------------- generation

    def generate_preprocess(self, x, sequence_length=None):
        """Packs prompts for generation.

        Each prompt gets the start token (if `add_start_token`) and no end
        token, and is right-padded (or cut) to `sequence_length`.

        Args:
            x: a string, a list / numpy array of strings, or a string
                `tf.Tensor`.
            sequence_length: overrides `self.sequence_length`.

        Returns:
            ``{"token_ids": int32, "padding_mask": bool}``, numpy arrays (or
            tf tensors for a tf input), without a batch axis for one string.
        """
        length = _check_length(
            self.sequence_length if sequence_length is None else sequence_length,
            "sequence_length",
        )
        token_ids, mask, batched, _ = self._pack(x, length, self.add_start_token, False)
        if not batched:
            token_ids, mask = token_ids[0], mask[0]
        return {"token_ids": token_ids, "padding_mask": mask}

    def generate_postprocess(self, x):
        """Turns generated ids back into text.

        Positions where ``padding_mask`` is False are dropped, and so are the
        control tokens (`<pad>`, `<bos>`, `<eos>`, `<start_of_turn>`,
        `<end_of_turn>`, `<unusedN>`, ...: `tokenizer.special_token_ids`).

        Args:
            x: ``{"token_ids", "padding_mask"}`` (numpy, JAX, torch or TF
                arrays, rank 1 or 2), or the token ids alone.

        Returns:
            A `str` for rank-1 ids, a list of `str` for a batch; inside a
            TensorFlow graph, a string `tf.Tensor`.
        """
        if isinstance(x, Mapping):
            if "token_ids" not in x:
                raise ValueError(
                    "`x` must have a 'token_ids' entry (and optionally "
                    f"'padding_mask'); got keys {sorted(x)}."
                )
            token_ids, mask = x["token_ids"], x.get("padding_mask")
        else:
            token_ids, mask = x, None
        if _is_tf_tensor(token_ids) and not _tf().executing_eagerly():
            return self._tf_generate_postprocess(token_ids, mask)
        token_ids = _to_numpy(token_ids)
        if token_ids.dtype.kind not in "iu":
            raise TypeError(
                f"`token_ids` must hold integer ids; got dtype {token_ids.dtype}."
            )
        if token_ids.ndim not in (1, 2):
            raise ValueError(
                f"`token_ids` must have rank 1 or 2; got shape {token_ids.shape}."
            )
        mask = (
            np.ones(token_ids.shape, bool)
            if mask is None
            else _to_numpy(mask).astype(bool)
        )
        if mask.shape != token_ids.shape:
            raise ValueError(
                f"`padding_mask` has shape {mask.shape}, `token_ids` {token_ids.shape};"
                " they must match."
            )
        single = token_ids.ndim == 1
        token_ids, mask = np.atleast_2d(token_ids), np.atleast_2d(mask)
        rows = [ids[keep].tolist() for ids, keep in zip(token_ids, mask)]
        texts = self.tokenizer.detokenize(rows, skip_special_tokens=True)
        return texts[0] if single else texts

    def _tf_generate_postprocess(self, token_ids, mask):
        tf = _tf()
        token_ids = tf.cast(token_ids, tf.int32)
        if mask is None:
            mask = tf.ones_like(token_ids, dtype=tf.bool)
        mask = tf.cast(mask, tf.bool)
        single = token_ids.shape.rank == 1
        if single:
            token_ids, mask = token_ids[tf.newaxis], mask[tf.newaxis]
        ids = tf.ragged.boolean_mask(token_ids, mask)
        texts = self.tokenizer.detokenize(ids, skip_special_tokens=True)
        return texts[0] if single else texts

    # ---------------------------------------------------------------- chat

    def chat_preprocess(self, conversations, sequence_length=None):
        """Packs conversations for fine-tuning, with loss on the model's turns.

        Each conversation is rendered with `keras_gemma.chat.render_chat`
        (starting with `<bos>`, no `<eos>`: a model turn ends with
        `<end_of_turn>`), tokenized, cut to ``sequence_length + 1`` tokens and
        padded like `call`. ``sample_weight`` is 1 where the label is part of
        a model turn's content or the `<end_of_turn>` closing it, and 0
        elsewhere (system and user text, turn headers, padding).

        Args:
            conversations: a conversation (a list of ``{"role", "content"}``
                dicts) or a list of conversations.
            sequence_length: overrides `self.sequence_length`.

        Returns:
            ``({"token_ids", "padding_mask"}, labels, sample_weight)`` as
            numpy arrays, without a batch axis for a single conversation.
        """
        length = _check_length(
            self.sequence_length if sequence_length is None else sequence_length,
            "sequence_length",
        )
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise TypeError(
                "`conversations` must be a conversation (a list of {'role', "
                "'content'} dicts) or a list of conversations; got "
                f"{conversations!r:.80}."
            )
        single = isinstance(conversations[0], Mapping)
        batch = [conversations] if single else list(conversations)
        rows, flags = [], []
        for messages in batch:
            ids, trained = [], []
            for text, is_model_output in chat_segments(messages, add_bos=True):
                pieces = self.tokenizer.tokenize(text)
                ids.extend(pieces)
                trained.extend([is_model_output] * len(pieces))
            rows.append(ids)
            flags.append(trained)
        token_ids, mask = self._pack_numpy(rows, length + 1)
        trained = np.zeros(token_ids.shape, np.float32)
        for index, row in enumerate(flags):
            row = row[: length + 1]
            trained[index, : len(row)] = row
        weights = trained[:, 1:] * mask[:, 1:]
        inputs = {"token_ids": token_ids[:, :-1], "padding_mask": mask[:, :-1]}
        labels = token_ids[:, 1:]
        if single:
            inputs = {key: value[0] for key, value in inputs.items()}
            labels, weights = labels[0], weights[0]
        return inputs, labels, weights


def _to_numpy(value):
    if _is_tf_tensor(value):
        return np.asarray(value.numpy())
    return np.asarray(_to_numpy_if_backend_tensor(value))
