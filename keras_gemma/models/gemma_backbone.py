"""The Gemma decoder stack: one class for Gemma 1, Gemma 2 and Gemma 3 text."""

import keras
from keras import ops

from keras_gemma.layers.attention import ATTENTION_TYPES
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.rms_normalization import GemmaRMSNormalization
from keras_gemma.layers.token_embedding import TiedTokenEmbedding
from keras_gemma.models import lora
from keras_gemma.models.quantization import (
    QUANTIZATION_MODES,
    with_gemma_quantize_defaults,
)


def _per_attention_type(value, name):
    """Expands a number, or a dict keyed by attention type, to such a dict."""
    if isinstance(value, dict):
        unknown = set(value) - set(ATTENTION_TYPES)
        if unknown or set(value) != set(ATTENTION_TYPES):
            raise ValueError(
                f"`{name}` must be a number or a dict with exactly the keys "
                f"{list(ATTENTION_TYPES)}, got {value!r}."
            )
        values = {key: float(value[key]) for key in ATTENTION_TYPES}
    else:
        values = {key: float(value) for key in ATTENTION_TYPES}
    for key, number in values.items():
        if number <= 0:
            raise ValueError(f"`{name}[{key!r}]` must be positive, got {number}.")
    return values


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(keras.Model):
    """Gemma decoder: token embedding, a stack of decoder blocks, final norm.

    One class serves Gemma 1, CodeGemma, Gemma 2, ShieldGemma and Gemma 3
    text. The generations differ only in configuration: the per-layer list
    of attention types, the RoPE base and scaling per attention type,
    soft-caps, the query scaling scalar, QK-norm and post-norms.

    Args:
        vocabulary_size: number of tokens.
        num_layers: number of decoder blocks.
        num_query_heads: attention heads for queries.
        num_key_value_heads: attention heads for keys and values; divides
            `num_query_heads`.
        hidden_dim: model width.
        intermediate_dim: width of each of the two feed-forward branches.
        head_dim: size of each attention head.
        layer_types: list of `"global"` / `"local"`, one per layer. Default
            all global.
        sliding_window_size: tokens a local layer sees (itself included).
        query_pre_attn_scalar: queries are scaled by its inverse square
            root. Default `head_dim`.
        attention_logit_soft_cap: attention soft-cap (Gemma 2), or `None`.
        final_logit_soft_cap: output logit soft-cap (Gemma 2), or `None`.
        use_query_key_norm: RMS-normalize queries and keys (Gemma 3).
        use_post_attention_norm: normalize attention outputs (Gemma 2, 3).
        use_post_ffw_norm: normalize feed-forward outputs (Gemma 2, 3).
        rope_max_wavelength: RoPE base, a number or a dict keyed by attention
            type, e.g. `{"global": 1e6, "local": 1e4}` for Gemma 3.
        rope_scaling_factor: RoPE linear scaling, a number or such a dict.
        layer_norm_epsilon: epsilon of every RMS norm.
        lora: LoRA settings `{"rank", "alpha", "target_names"}` to enable at
            construction (how a saved LoRA model restores its adapters); use
            `enable_lora` otherwise.
        quantization: `"int8"` or `"int4"` to build the projections and the
            embedding quantized (how a saved quantized model restores its
            layout); use `quantize` otherwise.
        dtype: a Keras dtype or dtype policy, e.g. `"bfloat16"`.

    Inputs are a dict `{"token_ids": (batch, length) int,
    "padding_mask": (batch, length)}`, where the padding mask is 1 for real
    tokens. Padding may be on the right (training) or on the left
    (generation); positions count real tokens only. The output is the final
    hidden states, `(batch, length, hidden_dim)`.

    Example:

    >>> import numpy as np
    >>> backbone = GemmaBackbone(vocabulary_size=100, num_layers=2,
    ...     num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
    ...     intermediate_dim=64, head_dim=8, layer_types=["local", "global"],
    ...     sliding_window_size=4)
    >>> hidden = backbone({"token_ids": np.array([[2, 5, 9, 0]]),
    ...                    "padding_mask": np.array([[1, 1, 1, 0]])})
    >>> tuple(hidden.shape)
    (1, 4, 32)
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        layer_types=None,
        sliding_window_size=None,
        query_pre_attn_scalar=None,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_query_key_norm=False,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        lora=None,
        quantization=None,
        dtype=None,
        **kwargs,
    ):
        for name, value in (
            ("vocabulary_size", vocabulary_size),
            ("num_layers", num_layers),
            ("num_query_heads", num_query_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("hidden_dim", hidden_dim),
            ("intermediate_dim", intermediate_dim),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`, "
                f"got {num_query_heads} and {num_key_value_heads}."
            )
        layer_types = list(layer_types or ["global"] * num_layers)
        if len(layer_types) != num_layers:
            raise ValueError(
                f"`layer_types` has {len(layer_types)} entries but `num_layers` "
                f"is {num_layers}: give one attention type per layer."
            )
        for index, layer_type in enumerate(layer_types):
            if layer_type not in ATTENTION_TYPES:
                raise ValueError(
                    f"`layer_types[{index}]` is {layer_type!r}; allowed: "
                    f"{list(ATTENTION_TYPES)}."
                )
        if "local" in layer_types and (
            not isinstance(sliding_window_size, int) or sliding_window_size <= 0
        ):
            raise ValueError(
                "`sliding_window_size` must be a positive integer when "
                f"`layer_types` has local layers, got {sliding_window_size!r}."
            )
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim
        if query_pre_attn_scalar <= 0:
            raise ValueError(
                "`query_pre_attn_scalar` must be positive, got "
                f"{query_pre_attn_scalar}."
            )
        for name, cap in (
            ("attention_logit_soft_cap", attention_logit_soft_cap),
            ("final_logit_soft_cap", final_logit_soft_cap),
        ):
            if cap is not None and cap <= 0:
                raise ValueError(f"`{name}` must be positive or None, got {cap}.")
        rope_max_wavelength = _per_attention_type(
            rope_max_wavelength, "rope_max_wavelength"
        )
        rope_scaling_factor = _per_attention_type(
            rope_scaling_factor, "rope_scaling_factor"
        )

        super().__init__(dtype=dtype, **kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.layer_types = layer_types
        self.sliding_window_size = sliding_window_size
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon

        policy = self.dtype_policy
        self.token_embedding = TiedTokenEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            logit_soft_cap=final_logit_soft_cap,
            dtype=policy,
            name="token_embedding",
        )
        self.transformer_layers = [
            GemmaDecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                attention_type=layer_type,
                sliding_window_size=(
                    sliding_window_size if layer_type == "local" else None
                ),
                logit_soft_cap=attention_logit_soft_cap,
                use_query_key_norm=use_query_key_norm,
                use_post_attention_norm=use_post_attention_norm,
                use_post_ffw_norm=use_post_ffw_norm,
                rope_max_wavelength=rope_max_wavelength[layer_type],
                rope_scaling_factor=rope_scaling_factor[layer_type],
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=policy,
                name=f"decoder_block_{index}",
            )
            for index, layer_type in enumerate(layer_types)
        ]
        self.final_norm = GemmaRMSNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="final_norm"
        )
        if quantization is not None and quantization not in QUANTIZATION_MODES:
            raise ValueError(
                '`quantization` must be None, "int8" or "int4"; got '
                f"{quantization!r}. Other Keras modes (gptq, awq) need "
                "calibration: call `quantize` on the built model instead."
            )
        self.lora_settings = None
        with_gemma_quantize_defaults(self)
        self.build(None)
        if quantization:
            self.quantize(quantization)
        if lora:
            self.enable_lora(
                lora["rank"], target_names=lora["target_names"], alpha=lora["alpha"]
            )

    def build(self, input_shape=None):
        if self.built:
            return
        self.token_embedding.build((None, None))
        hidden_shape = (None, None, self.hidden_dim)
        for block in self.transformer_layers:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        self.built = True

    # -- masks and positions ------------------------------------------------

    def _attention_mask(self, padding_mask, attention_type):
        """Mask for a sequence attending to itself: causal, padding, window."""
        length = ops.shape(padding_mask)[1]
        columns = ops.arange(length, dtype="int32")
        query_columns = columns[:, None]
        key_columns = columns[None, :]
        allowed = key_columns <= query_columns
        if attention_type == "local":
            allowed = ops.logical_and(
                allowed, key_columns > query_columns - self.sliding_window_size
            )
        key_is_token = ops.cast(padding_mask, "bool")[:, None, :]
        return ops.logical_and(allowed[None, :, :], key_is_token)

    @staticmethod
    def positions_from_padding_mask(padding_mask):
        """Position of each token, counting only real tokens before it."""
        counts = ops.cumsum(ops.cast(padding_mask, "int32"), axis=1)
        return ops.maximum(counts - 1, 0)

    # -- the forward pass ---------------------------------------------------

    def call(self, inputs):
        hidden, _ = self.forward_with_key_values(
            inputs["token_ids"], inputs["padding_mask"]
        )
        return hidden

    def forward_with_key_values(self, token_ids, padding_mask):
        """Runs the whole sequence; returns hidden states and per-layer K/V."""
        positions = self.positions_from_padding_mask(padding_mask)
        masks = {
            attention_type: self._attention_mask(padding_mask, attention_type)
            for attention_type in set(self.layer_types)
        }
        hidden = self.token_embedding(token_ids)
        key_values = []
        for block in self.transformer_layers:
            hidden, layer_key_values = block(
                hidden,
                positions=positions,
                attention_mask=masks[block.attention_type],
            )
            key_values.append(layer_key_values)
        return self.final_norm(hidden), key_values

    # -- key/value cache for generation ------------------------------------

    def cache_length(self, attention_type, total_length):
        """Slots in a layer's cache: bounded by the window on local layers."""
        if attention_type == "local":
            return min(self.sliding_window_size, total_length)
        return total_length

    def prefill(self, token_ids, padding_mask, total_length):
        """Runs a left-padded prompt and lays its keys/values into caches.

        Args:
            token_ids: `(batch, prompt_length)` left-padded prompt ids.
            padding_mask: `(batch, prompt_length)`, 1 for real tokens.
            total_length: prompt length plus the most tokens to generate;
                sizes the global layers' caches.

        Returns:
            `(hidden, caches)`: final hidden states of the prompt and one
            `(keys, values)` pair per layer. Cache slot `s` of a layer with
            `n` slots holds the latest column `c` with `c % n == s`, so local
            layers keep a rolling buffer of their window.
        """
        hidden, key_values = self.forward_with_key_values(token_ids, padding_mask)
        prompt_length = token_ids.shape[1]
        caches = []
        for block, layer_key_values in zip(self.transformer_layers, key_values):
            slots = self.cache_length(block.attention_type, total_length)
            caches.append(
                tuple(
                    _lay_out_cache(tensor, prompt_length, slots)
                    for tensor in layer_key_values
                )
            )
        return hidden, caches

    def decode(self, token_ids, column, start_columns, caches):
        """Runs one new token per sequence against the caches.

        Args:
            token_ids: `(batch, 1)` the tokens at `column`.
            column: scalar int, the column being generated.
            start_columns: `(batch,)` first real column of each left-padded
                sequence.
            caches: per-layer `(keys, values)` from `prefill` or an earlier
                `decode`.

        Returns:
            `(hidden, caches)` with hidden states `(batch, 1, hidden_dim)`.
        """
        column = ops.cast(column, "int32")
        start_columns = ops.cast(start_columns, "int32")
        positions = (column - start_columns)[:, None]
        masks = {}
        hidden = self.token_embedding(token_ids)
        new_caches = []
        for block, cache in zip(self.transformer_layers, caches):
            slots = cache[0].shape[1]
            if slots not in masks:
                slot_index = ops.arange(slots, dtype="int32")
                held_column = column - ops.mod(column - slot_index, slots)
                valid = held_column[None, :] >= start_columns[:, None]
                masks[slots] = valid[:, None, :]
            hidden, cache = block(
                hidden,
                positions=positions,
                attention_mask=masks[slots],
                cache=cache,
                cache_index=ops.mod(column, slots),
            )
            new_caches.append(cache)
        return self.final_norm(hidden), new_caches

    # -- LoRA -----------------------------------------------------------------

    def enable_lora(self, rank, target_names=None, alpha=None):
        """Adds low-rank adapters and makes them the only trainable weights.

        Args:
            rank: rank of each adapter, a positive integer.
            target_names: projections to adapt in every layer, from
                `"query"`, `"key"`, `"value"`, `"attention_output"`,
                `"gate"`, `"up"`, `"down"`. Default query and value.
            alpha: adapter scaling numerator (`alpha / rank`). Default `rank`.

        Example:

        >>> backbone = GemmaBackbone(vocabulary_size=50, num_layers=2,
        ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        ...     intermediate_dim=32, head_dim=8)
        >>> backbone.enable_lora(rank=4)
        >>> sorted({w.path.split("/")[-2] for w in backbone.trainable_weights})
        ['query', 'value']
        """
        lora.enable_lora(self, rank, target_names=target_names, alpha=alpha)

    def save_lora_weights(self, path):
        """Saves only the adapters, keyed by layer path, to a safetensors file."""
        lora.save_lora_weights(self, path)

    def load_lora_weights(self, path):
        """Restores adapters saved by `save_lora_weights`, matched by layer path;
        enables LoRA with the saved settings if needed."""
        lora.load_lora_weights(self, path)

    def merge_lora_weights(self):
        """Returns a new backbone without adapters, whose kernels include them."""
        return lora.merge_lora_weights(self)

    # -- distribution ---------------------------------------------------------

    def get_layout_map(
        self,
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` for `ModelParallel` on `device_mesh`.

        The embedding table is split over vocabulary rows, attention
        projections over heads (over the hidden axis when there are fewer
        heads than devices on the model axis, as with multi-query keys and
        values), and the feed-forward weights over their intermediate axis.
        Norms are replicated.

        Example:

        >>> import keras
        >>> backbone = GemmaBackbone(vocabulary_size=64, num_layers=1,
        ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        ...     intermediate_dim=32, head_dim=8)
        >>> mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"],
        ...                                      ["cpu:0"])
        >>> layout_map = backbone.get_layout_map(mesh)
        >>> tuple(layout_map["gemma_backbone/token_embedding/embeddings"].axes)
        ('model', None)
        """
        names = tuple(device_mesh.axis_names)
        for argument, name in (
            ("model_parallel_dim_name", model_parallel_dim_name),
            ("data_parallel_dim_name", data_parallel_dim_name),
        ):
            if name not in names:
                raise ValueError(
                    f"`{argument}` is {name!r} but the device mesh has axes "
                    f"{list(names)}; name one of them."
                )
        model = model_parallel_dim_name
        model_size = device_mesh.shape[names.index(model)]

        def heads_or_hidden(heads, heads_axis, hidden_axis, rank=3):
            axes = [None] * rank
            axes[heads_axis if heads % model_size == 0 else hidden_axis] = model
            return tuple(axes)

        # Keys are regular expressions matched against whole variable paths.
        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map[r".*/token_embedding/embeddings"] = (model, None)
        layout_map[r".*/attention/query/kernel"] = heads_or_hidden(
            self.num_query_heads, 0, 1
        )
        layout_map[r".*/attention/(key|value)/kernel"] = heads_or_hidden(
            self.num_key_value_heads, 0, 1
        )
        layout_map[r".*/attention/attention_output/kernel"] = heads_or_hidden(
            self.num_query_heads, 0, 2
        )
        layout_map[r".*/ffw/(gate|up)/kernel"] = (None, model)
        layout_map[r".*/ffw/down/kernel"] = (model, None)
        return layout_map

    # -- configuration ------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            # The policy's name, not `serialize_keras_object`, which imports
            # TensorFlow whenever it is installed.
            "dtype": self.dtype_policy.name,
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window_size": self.sliding_window_size,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "use_query_key_norm": self.use_query_key_norm,
            "use_post_attention_norm": self.use_post_attention_norm,
            "use_post_ffw_norm": self.use_post_ffw_norm,
            "rope_max_wavelength": dict(self.rope_max_wavelength),
            "rope_scaling_factor": dict(self.rope_scaling_factor),
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "lora": self.lora_settings,
            "quantization": self.token_embedding.quantization_mode,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, dtype=None):
        """Builds a backbone with the weights of a checkpoint.

        Args:
            preset: a built-in preset name (`keras_gemma.list_presets()`), a
                keras-gemma preset directory, a transformers directory, a
                keras-hub (Kaggle) preset directory, a `.gguf` file,
                `hf://owner/name` or `kaggle://owner/model/keras/variation`.
            dtype: the compute and weight dtype, e.g. `"bfloat16"`. Weights
                are cast tensor by tensor straight into it.
        """
        from keras_gemma.checkpoints.preset_loading import load_backbone

        return load_backbone(preset, dtype=dtype)

    def save_to_preset(self, directory, max_shard_size="5GB"):
        """Writes config and safetensors weights to `directory`, atomically."""
        from keras_gemma.checkpoints.preset_loading import save_to_preset

        return save_to_preset(self, directory, max_shard_size=max_shard_size)

    def export_to_transformers(self, directory, max_shard_size="5GB"):
        """Writes a Hugging Face transformers checkpoint of this backbone."""
        from keras_gemma.checkpoints.preset_loading import export_to_transformers

        return export_to_transformers(self, directory, max_shard_size=max_shard_size)


def _lay_out_cache(tensor, prompt_length, slots):
    """Places a prompt's keys or values (batch, prompt_length, ...) into
    `slots` cache slots, column `c` going to slot `c % slots`."""
    if prompt_length <= slots:
        padding = [(0, 0), (0, slots - prompt_length), (0, 0), (0, 0)]
        return ops.pad(tensor, padding)
    kept = tensor[:, prompt_length - slots :]
    shift = (prompt_length - slots) % slots
    if shift == 0:
        return kept
    return ops.concatenate([kept[:, slots - shift :], kept[:, : slots - shift]], axis=1)
