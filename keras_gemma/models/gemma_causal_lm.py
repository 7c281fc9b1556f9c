"""Gemma causal language model: a backbone plus the tied output projection."""

import numbers
import re
from collections.abc import Mapping

import keras
import numpy as np

from keras_gemma.generation import samplers as samplers_lib
from keras_gemma.generation.decode_loop import DecodeEngine
from keras_gemma.generation.streaming import TextStreamer
from keras_gemma.models.quantization import with_gemma_quantize_defaults

# `<end_of_turn>` in every published Gemma vocabulary (256000 / 262144
# pieces); used for `stop_token_ids="auto"` when there is no tokenizer.
_GEMMA_END_OF_TURN_ID = 107
_GEMMA_VOCABULARY_MIN = 256000
_EOS_ID = 1
_SCORING_MODES = ("logits", "loss")


def _check_optional_positive_int(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer (> 0), got {value}.")
    return int(value)


def _is_tf_dataset(value):
    import sys

    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.data.Dataset)


def _is_text(value):
    """True for a string, a list / array of strings or a string tf.Tensor."""
    import sys

    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "USO"
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(isinstance(v, (str, bytes)) for v in value)
    tf = sys.modules.get("tensorflow")
    if tf is not None and tf.is_tensor(value):
        return value.dtype == tf.string
    return False


def _text_batch(inputs):
    """Returns `(list of str, single)` for generation inputs given as text."""
    import sys

    tf = sys.modules.get("tensorflow")
    if tf is not None and tf.is_tensor(inputs) and inputs.dtype == tf.string:
        inputs = inputs.numpy()
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in "USO" or inputs.ndim > 1:
            raise ValueError(
                "`inputs` must be a string or a 1-D batch of strings; got an "
                f"array of dtype {inputs.dtype} and shape {inputs.shape}."
            )
        inputs = inputs.item() if inputs.ndim == 0 else inputs.tolist()
    if isinstance(inputs, bytes):
        inputs = inputs.decode("utf-8")
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("`inputs` is an empty list: give at least one prompt.")
        texts = []
        for index, text in enumerate(inputs):
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            if not isinstance(text, str):
                raise ValueError(
                    f"`inputs[{index}]` must be a string, got {type(text).__name__}."
                )
            texts.append(text)
        return texts, False
    raise ValueError(
        "`inputs` must be a string, a list of strings, or a dict with "
        f"'token_ids' and 'padding_mask'; got {type(inputs).__name__}."
    )


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(keras.Model):
    """Gemma language model: next-token logits, training and generation.

    Calling the model on `{"token_ids", "padding_mask"}` returns float32
    logits of shape `(batch, length, vocabulary_size)`. `fit`, `evaluate`
    and `predict` accept raw strings (or a `tf.data.Dataset` of strings)
    when the model has a preprocessor. `generate` and `stream` produce
    text with a compiled decode loop (see `keras_gemma.generation`), and
    `score` gives logits or per-token losses for evaluation.

    The model is compiled at construction with the defaults of `compile()`
    (Adam, sparse categorical cross-entropy on logits, weighted accuracy,
    greedy sampling), so `fit` and `generate` work straight away.

    Args:
        backbone: a `GemmaBackbone`.
        preprocessor: a `GemmaCausalLMPreprocessor`, or `None` to work on
            token ids directly.
        instruction_tuned: whether the weights are an instruction-tuned
            (chat) release; `stop_token_ids="auto"` then also stops on
            `<end_of_turn>`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone
    >>> backbone = GemmaBackbone(vocabulary_size=50, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
    ...     intermediate_dim=32, head_dim=8)
    >>> lm = GemmaCausalLM(backbone)
    >>> logits = lm({"token_ids": np.array([[2, 7, 9]]),
    ...              "padding_mask": np.array([[1, 1, 1]])})
    >>> tuple(logits.shape)
    (1, 3, 50)
    >>> out = lm.generate({"token_ids": np.array([[2, 7, 9, 0, 0]]),
    ...                    "padding_mask": np.array([[1, 1, 1, 0, 0]])},
    ...                   stop_token_ids=None)
    >>> out["padding_mask"].tolist()
    [[True, True, True, True, True]]
    """

    def __init__(self, backbone, preprocessor=None, instruction_tuned=False, **kwargs):
        # The backbone's policy, not the global one: under mixed_float16 the
        # model's `compile` then wraps the optimizer for loss scaling.
        kwargs.setdefault("dtype", backbone.dtype_policy)
        super().__init__(**kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.instruction_tuned = bool(instruction_tuned)
        self._decode_engine = None
        self.sampler = samplers_lib.GreedySampler()
        with_gemma_quantize_defaults(self)
        # The backbone builds its weights at construction: so is this model.
        self.built = bool(getattr(backbone, "built", False))
        self.compile()

    def call(self, inputs):
        hidden = self.backbone(inputs)
        return self.backbone.token_embedding(hidden, reverse=True)

    # -- training ------------------------------------------------------------

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """Configures training and the default sampler of `generate`.

        Args:
            optimizer: `"auto"` for Adam with learning rate 2e-5, or any
                Keras optimizer.
            loss: `"auto"` for sparse categorical cross-entropy on logits.
            weighted_metrics: `"auto"` for sparse categorical accuracy,
                weighted by the preprocessor's sample weights (padding does
                not count).
            sampler: a sampler name (`"greedy"`, `"random"`, `"top_k"`,
                `"top_p"`, `"beam"`), a config dict or a `Sampler`.
            **kwargs: passed to `keras.Model.compile`.

        Example:

        ```python
        lm.compile(sampler="top_k")
        lm.compile(optimizer=keras.optimizers.AdamW(1e-4),
                   sampler={"name": "top_p", "p": 0.9, "temperature": 0.8})
        ```
        """
        sampler = samplers_lib.get(sampler)
        if isinstance(optimizer, str) and optimizer == "auto":
            optimizer = keras.optimizers.Adam(learning_rate=2e-5)
        if isinstance(loss, str) and loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if isinstance(weighted_metrics, str) and weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(
            optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )
        self.sampler = sampler

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config["sampler"] = samplers_lib.serialize(self.sampler)
        return config

    def compile_from_config(self, config):
        config = dict(config)
        sampler = config.pop("sampler", "greedy")
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config, sampler=sampler)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _preprocess_samples(self, x, y=None, sample_weight=None):
        """Runs the preprocessor on text; other data passes unchanged."""
        if self.preprocessor is None:
            return x, y, sample_weight
        if _is_tf_dataset(x):
            import tensorflow as tf

            spec = x.element_spec
            if isinstance(spec, tf.TensorSpec) and spec.dtype == tf.string:
                mapped = x.map(self.preprocessor, num_parallel_calls=tf.data.AUTOTUNE)
                return mapped, None, None
            return x, y, sample_weight
        if _is_text(x):
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "With text inputs the preprocessor makes the labels and sample "
                    "weights (the next token at each position); pass only `x`."
                )
            return self.preprocessor(x)
        return x, y, sample_weight

    def _preprocess_validation(self, validation_data):
        if validation_data is None or self.preprocessor is None:
            return validation_data
        if _is_tf_dataset(validation_data) or _is_text(validation_data):
            x, y, sample_weight = self._preprocess_samples(validation_data)
            return x if y is None else (x, y, sample_weight)
        return validation_data

    def fit(
        self, x=None, y=None, *args, sample_weight=None, validation_data=None, **kwargs
    ):
        """Trains the model; strings are run through the preprocessor.

        `x` can be a list (or numpy array) of strings, a `tf.data.Dataset`
        of (batched) strings, or already preprocessed data as for
        `keras.Model.fit`. Other arguments are those of `keras.Model.fit`.

        Example:

        ```python
        lm.fit(["The quick brown fox.", "Jumps over the lazy dog."],
               batch_size=2, epochs=1)
        ```
        """
        x, y, sample_weight = self._preprocess_samples(x, y, sample_weight)
        validation_data = self._preprocess_validation(validation_data)
        return super().fit(
            x,
            y,
            *args,
            sample_weight=sample_weight,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, *args, sample_weight=None, **kwargs):
        """Like `keras.Model.evaluate`; strings go through the preprocessor."""
        x, y, sample_weight = self._preprocess_samples(x, y, sample_weight)
        return super().evaluate(x, y, *args, sample_weight=sample_weight, **kwargs)

    def predict(self, x, *args, **kwargs):
        """Like `keras.Model.predict` (logits); strings go through the
        preprocessor first."""
        if self.preprocessor is not None and (_is_text(x) or _is_tf_dataset(x)):
            x, _, _ = self._preprocess_samples(x)
            if _is_tf_dataset(x):
                x = x.map(lambda inputs, *rest: inputs)
        return super().predict(x, *args, **kwargs)

    # -- quantization ----------------------------------------------------------

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the backbone's weights, as `keras.Model.quantize` does.

        Arguments are those of `keras.Model.quantize` (`mode` `"int8"` or
        `"int4"`, or a quantization `config` of one of those modes; `filters`
        selects layers by name or with a callable). The preprocessor holds
        no weights and is left alone, so its tokenizer does not warn that it
        cannot be quantized.

        `"int8"` without a config quantizes the weights only (see
        `keras_gemma.models.quantization.resolve_quantization_config`).
        Other Keras modes are refused before anything changes: `"float8"`
        would quantize the projections but not the tied embedding, leaving
        a model whose config does not record it (so it cannot be reloaded),
        and `"gptq"` / `"awq"` need a calibration structure this model does
        not define.
        """
        if self.preprocessor is None:
            return super().quantize(mode, config=config, filters=filters, **kwargs)
        skipped = {id(layer) for layer in self.preprocessor._flatten_layers()}

        def selected(layer):
            if id(layer) in skipped:
                return False
            if filters is None:
                return True
            if isinstance(filters, str):
                return re.search(filters, layer.name) is not None
            if isinstance(filters, (list, tuple)):
                return any(re.search(pattern, layer.name) for pattern in filters)
            return bool(filters(layer))

        if filters is not None and not (
            isinstance(filters, (str, list, tuple)) or callable(filters)
        ):
            # Let Keras reject it with its own message.
            return super().quantize(mode, config=config, filters=filters, **kwargs)
        return super().quantize(mode, config=config, filters=selected, **kwargs)

    # -- generation ----------------------------------------------------------

    @property
    def decode_engine(self):
        """The `DecodeEngine` holding this model's compiled decode loops."""
        if self._decode_engine is None:
            pad = 0
            if self.preprocessor is not None:
                pad = self.preprocessor.tokenizer.pad_token_id
            self._decode_engine = DecodeEngine(self.backbone, pad_token_id=pad)
        return self._decode_engine

    def _resolve_stop_token_ids(self, stop_token_ids):
        if stop_token_ids is None:
            return ()
        vocabulary = self.backbone.vocabulary_size
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(
                    "`stop_token_ids` must be 'auto', None or a list of token ids, "
                    f"got {stop_token_ids!r}."
                )
            if self.preprocessor is not None:
                tokenizer = self.preprocessor.tokenizer
                ids = [tokenizer.eos_token_id]
                end_of_turn = tokenizer.end_of_turn_token_id
                if self.instruction_tuned and end_of_turn is not None:
                    ids.append(end_of_turn)
                return tuple(ids)
            ids = [_EOS_ID]
            if self.instruction_tuned and vocabulary >= _GEMMA_VOCABULARY_MIN:
                ids.append(_GEMMA_END_OF_TURN_ID)
            return tuple(ids)
        ids = np.asarray(stop_token_ids).reshape(-1)
        if ids.size and (
            ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocabulary
        ):
            raise ValueError(
                "`stop_token_ids` must be 'auto', None or a list of token ids in "
                f"[0, {vocabulary}), got {stop_token_ids!r}."
            )
        return tuple(int(i) for i in ids)

    def _prompt_arrays(self, inputs):
        """Right-padded `(token_ids, padding_mask, single, is_dict)` of
        generation inputs."""
        if isinstance(inputs, Mapping):
            missing = {"token_ids", "padding_mask"} - set(inputs)
            if missing:
                raise ValueError(
                    "A dict of prompts needs 'token_ids' and 'padding_mask'; "
                    f"missing {sorted(missing)}."
                )
            token_ids = np.asarray(keras.ops.convert_to_numpy(inputs["token_ids"]))
            mask = np.asarray(keras.ops.convert_to_numpy(inputs["padding_mask"]))
            if token_ids.dtype.kind not in "iu":
                raise ValueError(
                    f"`token_ids` must hold integer ids, got dtype {token_ids.dtype}."
                )
            single = token_ids.ndim == 1
            token_ids, mask = np.atleast_2d(token_ids), np.atleast_2d(mask)
            if token_ids.shape[0] == 0:
                raise ValueError("`token_ids` holds no prompts: give at least one.")
            if token_ids.ndim != 2 or mask.shape != token_ids.shape:
                raise ValueError(
                    "`token_ids` and `padding_mask` must both have shape "
                    f"(batch, length); got {token_ids.shape} and {mask.shape}."
                )
            if token_ids.size and (
                token_ids.min() < 0 or token_ids.max() >= self.backbone.vocabulary_size
            ):
                raise ValueError(
                    "`token_ids` must be in [0, "
                    f"{self.backbone.vocabulary_size}) (the vocabulary)."
                )
            return token_ids.astype(np.int32), mask.astype(bool), single, True
        if self.preprocessor is None:
            raise ValueError(
                "`generate` on text needs a preprocessor (GemmaCausalLM(..., "
                "preprocessor=...)); without one, pass a dict of right-padded "
                "'token_ids' and 'padding_mask'."
            )
        texts, single = _text_batch(inputs)
        tokenized = self.preprocessor.tokenizer.tokenize(texts)
        width = max(len(ids) for ids in tokenized) + 1  # room for <bos>
        packed = self.preprocessor.generate_preprocess(texts, sequence_length=width)
        return (
            np.asarray(packed["token_ids"], np.int32),
            np.asarray(packed["padding_mask"], bool),
            single,
            False,
        )

    def _budgets(self, lengths, width, is_dict, max_length, max_new_tokens):
        """New-token budget per row; raises for a prompt over `max_length`."""
        if max_length is None and max_new_tokens is None:
            max_length = width if is_dict else self.preprocessor.sequence_length
        if max_length is not None:
            too_long = np.flatnonzero(lengths > max_length)
            if too_long.size:
                row = int(too_long[0])
                raise ValueError(
                    f"Prompt {row} has {int(lengths[row])} tokens, more than "
                    f"`max_length`={max_length} (prompt plus generated tokens); "
                    "raise `max_length` or shorten the prompt."
                )
            budgets = max_length - lengths
        else:
            budgets = np.full_like(lengths, max_new_tokens)
        if max_new_tokens is not None:
            budgets = np.minimum(budgets, max_new_tokens)
        return budgets

    def _prepare_generation(
        self, inputs, max_length, max_new_tokens, stop_token_ids, sampler, seed
    ):
        """Validates everything before any compute."""
        max_length = _check_optional_positive_int(max_length, "max_length")
        max_new_tokens = _check_optional_positive_int(max_new_tokens, "max_new_tokens")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        ):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}.")
        sampler = self.sampler if sampler is None else samplers_lib.get(sampler)
        if sampler.is_beam_search and sampler.num_beams > self.backbone.vocabulary_size:
            raise ValueError(
                f"`num_beams` ({sampler.num_beams}) must not exceed the vocabulary "
                f"size ({self.backbone.vocabulary_size})."
            )
        stop_ids = self._resolve_stop_token_ids(stop_token_ids)
        token_ids, mask, single, is_dict = self._prompt_arrays(inputs)
        lengths = mask.sum(axis=1)
        columns = np.arange(mask.shape[1])[None, :]
        if not np.array_equal(mask, columns < lengths[:, None]):
            raise ValueError(
                "`padding_mask` must be right-padded: ones (True) for the prompt, "
                "then zeros."
            )
        if lengths.min() < 1:
            raise ValueError("Every prompt needs at least one token.")
        budgets = self._budgets(
            lengths, mask.shape[1], is_dict, max_length, max_new_tokens
        )
        return token_ids, mask, lengths, budgets, single, is_dict, stop_ids, sampler

    def generate(
        self,
        inputs,
        max_length=None,
        max_new_tokens=None,
        stop_token_ids="auto",
        strip_prompt=False,
        sampler=None,
        seed=None,
    ):
        """Generates continuations of prompts.

        Args:
            inputs: a string or a list of strings (with a preprocessor), or a
                dict `{"token_ids", "padding_mask"}` of right-padded prompt
                ids, `(batch, length)` or `(length,)`.
            max_length: the most tokens per sequence, prompt included.
                Default: the preprocessor's `sequence_length` for text, the
                dict's width for ids (unless `max_new_tokens` is given).
            max_new_tokens: the most tokens generated per prompt.
            stop_token_ids: `"auto"` stops on `<eos>` (and `<end_of_turn>`
                for instruction-tuned models); a list of ids stops on any of
                them; `None` never stops early. The stop token is kept in
                dict outputs; text drops special tokens.
            strip_prompt: return only the generated part.
            sampler: a sampler name, config dict or `Sampler` for this call;
                default the one given to `compile`.
            seed: an int making random samplers reproducible on a backend.

        Returns:
            For text, a string or list of strings (prompt included unless
            `strip_prompt`, special tokens removed). For a dict, a dict of
            numpy arrays with the generated ids written after each prompt
            and the padding mask extended over them.

        Raises:
            ValueError: for a prompt longer than `max_length`, a
                non-positive `max_length` / `max_new_tokens`, an unknown
                sampler or invalid sampler settings, an empty batch, or text
                without a preprocessor; before any computation.

        A batch of prompts of different lengths gives each prompt the same
        greedy continuation as generating it alone.

        Example:

        >>> import numpy as np
        >>> from keras_gemma import GemmaBackbone
        >>> backbone = GemmaBackbone(vocabulary_size=40, num_layers=1,
        ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        ...     intermediate_dim=32, head_dim=8)
        >>> lm = GemmaCausalLM(backbone)
        >>> prompts = {"token_ids": np.array([[2, 5, 7], [2, 9, 0]]),
        ...            "padding_mask": np.array([[1, 1, 1], [1, 1, 0]], bool)}
        >>> out = lm.generate(prompts, max_new_tokens=4, stop_token_ids=None)
        >>> out["token_ids"].shape, out["padding_mask"].sum(axis=1).tolist()
        ((2, 7), [7, 6])
        """
        (token_ids, mask, lengths, budgets, single, is_dict, stop_ids, sampler) = (
            self._prepare_generation(
                inputs, max_length, max_new_tokens, stop_token_ids, sampler, seed
            )
        )
        rows = self.decode_engine.generate(
            token_ids, mask, budgets, stop_ids, sampler, seed
        )
        pad = self.decode_engine.pad_token_id
        if strip_prompt:
            width = max([len(row) for row in rows] + [1])
            out_ids = np.full((len(rows), width), pad, np.int32)
            out_mask = np.zeros((len(rows), width), bool)
            for index, row in enumerate(rows):
                out_ids[index, : len(row)] = row
                out_mask[index, : len(row)] = True
        else:
            ends = lengths + np.array([len(row) for row in rows])
            width = max(int(ends.max()), token_ids.shape[1] if is_dict else 0)
            out_ids = np.full((len(rows), width), pad, np.int32)
            out_mask = np.zeros((len(rows), width), bool)
            for index, (length, row) in enumerate(zip(lengths, rows)):
                out_ids[index, :length] = token_ids[index, :length]
                out_ids[index, length : length + len(row)] = row
                out_mask[index, : length + len(row)] = True
        if is_dict:
            if single:
                return {"token_ids": out_ids[0], "padding_mask": out_mask[0]}
            return {"token_ids": out_ids, "padding_mask": out_mask}
        texts = self.preprocessor.generate_postprocess(
            {"token_ids": out_ids, "padding_mask": out_mask}
        )
        return texts[0] if single else list(texts)

    def stream(
        self,
        prompt,
        max_length=None,
        max_new_tokens=None,
        stop_token_ids="auto",
        sampler=None,
        seed=None,
    ):
        """Yields the generated text piece by piece as tokens are produced.

        Arguments are those of `generate` for one string prompt (beam search
        is not available). Pieces never split a multi-byte character, and
        their concatenation equals
        `generate(prompt, ..., strip_prompt=True)`. Arguments are checked
        when `stream` is called, before anything runs.

        Example:

        ```python
        for piece in lm.stream("Once upon a time", max_new_tokens=50):
            print(piece, end="", flush=True)
        ```
        """
        if not isinstance(prompt, str):
            raise ValueError(
                f"`stream` takes one string prompt, got {type(prompt).__name__}."
            )
        (token_ids, mask, _, budgets, _, _, stop_ids, sampler) = (
            self._prepare_generation(
                prompt, max_length, max_new_tokens, stop_token_ids, sampler, seed
            )
        )
        if sampler.is_beam_search:
            raise ValueError(
                "`stream` cannot use beam search (beams are reordered until the "
                "end); use `generate` with `sampler='beam'`."
            )
        steps = self.decode_engine.stream(
            token_ids, mask, budgets, stop_ids, sampler, seed
        )
        return TextStreamer(self.preprocessor.generate_postprocess).stream(
            rows[0] for rows in steps
        )

    # -- scoring -------------------------------------------------------------

    def score(
        self, token_ids, padding_mask=None, target_ids=None, scoring_mode="logits"
    ):
        """Scores token sequences for evaluation and perplexity.

        Args:
            token_ids: `(batch, length)` int ids.
            padding_mask: `(batch, length)`, 1 for real tokens (default all).
            target_ids: `(batch, length)` the token expected after each
                position (ids shifted left by one); needed for `"loss"`.
            scoring_mode: `"logits"` returns float32 logits
                `(batch, length, vocabulary_size)`; `"loss"` returns the
                per-token cross-entropy `(batch, length)`, 0 where
                `padding_mask` is 0.

        Returns:
            A backend tensor.

        Example:

        >>> import numpy as np
        >>> from keras_gemma import GemmaBackbone
        >>> backbone = GemmaBackbone(vocabulary_size=40, num_layers=1,
        ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        ...     intermediate_dim=32, head_dim=8)
        >>> lm = GemmaCausalLM(backbone)
        >>> ids = np.array([[2, 5, 7, 9]])
        >>> loss = lm.score(ids[:, :-1], target_ids=ids[:, 1:], scoring_mode="loss")
        >>> perplexity = float(np.exp(keras.ops.convert_to_numpy(loss).mean()))
        >>> perplexity > 1.0
        True
        """
        if scoring_mode not in _SCORING_MODES:
            raise ValueError(
                f"`scoring_mode` must be one of {list(_SCORING_MODES)}, got "
                f"{scoring_mode!r}."
            )
        token_ids = np.asarray(keras.ops.convert_to_numpy(token_ids))
        if token_ids.ndim != 2 or token_ids.dtype.kind not in "iu":
            raise ValueError(
                "`token_ids` must be integer ids of shape (batch, length), got "
                f"dtype {token_ids.dtype} and shape {token_ids.shape}."
            )
        if padding_mask is None:
            padding_mask = np.ones(token_ids.shape, bool)
        padding_mask = np.asarray(keras.ops.convert_to_numpy(padding_mask))
        if padding_mask.shape != token_ids.shape:
            raise ValueError(
                f"`padding_mask` has shape {padding_mask.shape}; `token_ids` has "
                f"{token_ids.shape}: they must match."
            )
        if scoring_mode == "loss":
            if target_ids is None:
                raise ValueError('`scoring_mode="loss"` needs `target_ids`.')
            target_ids = np.asarray(keras.ops.convert_to_numpy(target_ids))
            if target_ids.shape != token_ids.shape:
                raise ValueError(
                    f"`target_ids` has shape {target_ids.shape}; `token_ids` has "
                    f"{token_ids.shape}: they must match."
                )
        return self.decode_engine.score(
            token_ids.astype(np.int32),
            padding_mask.astype(np.int32),
            None if target_ids is None else target_ids.astype(np.int32),
        )

    # -- configuration -------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": (
                keras.saving.serialize_keras_object(self.preprocessor)
                if self.preprocessor is not None
                else None
            ),
            "instruction_tuned": self.instruction_tuned,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(
                config["preprocessor"]
            )
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, dtype=None, **kwargs):
        """Builds the model, with its preprocessor when the preset carries a
        tokenizer, from a preset name or checkpoint (see
        `keras_gemma.checkpoints.preset_loading.load_causal_lm`)."""
        from keras_gemma.checkpoints.preset_loading import load_causal_lm

        return load_causal_lm(preset, dtype=dtype, **kwargs)

    def save_to_preset(self, directory, max_shard_size="5GB"):
        """Writes backbone, tokenizer and preprocessor settings to a preset
        directory, atomically; `from_preset(directory)` reloads it."""
        from keras_gemma.checkpoints.preset_loading import save_to_preset

        return save_to_preset(self, directory, max_shard_size=max_shard_size)

    def export_to_transformers(self, directory, max_shard_size="5GB"):
        """Writes a Hugging Face transformers checkpoint (and tokenizer)."""
        from keras_gemma.checkpoints.preset_loading import export_to_transformers

        return export_to_transformers(self, directory, max_shard_size=max_shard_size)
