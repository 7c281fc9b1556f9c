"""Gemma multi-head attention: grouped-query heads, soft-cap, sliding window."""

import keras
from keras import ops

from keras_gemma.layers import storage_layout
from keras_gemma.layers.kv_cache import write_cache
from keras_gemma.layers.projection import Projection
from keras_gemma.layers.rms_normalization import GemmaRMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding, apply_rotary

ATTENTION_TYPES = ("global", "local")

# Added to masked attention logits (after the soft-cap, in float32).
_MASKED_LOGIT = -1e30


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaAttention(keras.layers.Layer):
    """Causal self-attention with multi-query or grouped-query heads.

    Queries are scaled by `query_pre_attn_scalar ** -0.5`, optionally
    normalized per head (Gemma 3 QK-norm) and rotated with RoPE. Attention
    logits may be soft-capped (Gemma 2). Which keys a query may see is given
    by the `attention_mask` argument, built by the backbone from the attention type
    (`"global"` or `"local"` with a sliding window).

    Args:
        hidden_dim: size of the input and output feature axis.
        num_query_heads: number of query heads.
        num_key_value_heads: number of key/value heads; must divide
            `num_query_heads` (1 is multi-query attention).
        head_dim: size of each head.
        query_pre_attn_scalar: queries are multiplied by its inverse square
            root.
        attention_type: `"global"` or `"local"`.
        sliding_window_size: window of a local layer, in tokens (the query
            itself included).
        logit_soft_cap: attention-logit soft-cap, or `None`.
        use_query_key_norm: RMS-normalize queries and keys per head.
        rope_max_wavelength: RoPE base frequency.
        rope_scaling_factor: RoPE linear position scaling.
        layer_norm_epsilon: epsilon of the query/key norms.

    Call arguments:
        inputs: `(batch, length, hidden_dim)`.
        positions: `(batch, length)` integer positions for RoPE.
        attention_mask: boolean `(batch, length, key_length)`; True where a query may
            attend to a key.
        cache: optional `(keys, values)`, each
            `(batch, cache_length, num_key_value_heads, head_dim)`. When
            given, the new keys and values are written at `cache_index` and
            the queries attend over the whole cache.
        cache_index: slot of the cache where the first new token goes.

    Returns:
        `(outputs, key_values)`: the attention output, and either the
        updated cache or, without a cache, this call's `(keys, values)`.

    Example:

    >>> import numpy as np
    >>> attention = GemmaAttention(hidden_dim=16, num_query_heads=4,
    ...     num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8)
    >>> x = np.ones((1, 3, 16), dtype="float32")
    >>> attention_mask = np.tril(np.ones((3, 3), dtype=bool))[None]
    >>> out, (k, v) = attention(x, positions=np.array([[0, 1, 2]]),
    ...                         attention_mask=attention_mask)
    >>> tuple(out.shape), tuple(k.shape)
    ((1, 3, 16), (1, 3, 2, 8))
    """

    def __init__(
        self,
        hidden_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_type="global",
        sliding_window_size=None,
        logit_soft_cap=None,
        use_query_key_norm=False,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"`attention_type` must be one of {ATTENTION_TYPES}, "
                f"got {attention_type!r}."
            )
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`, "
                f"got {num_query_heads} and {num_key_value_heads}."
            )
        if attention_type == "local" and not sliding_window_size:
            raise ValueError(
                "A local attention layer needs a positive `sliding_window_size`."
            )
        self.hidden_dim = hidden_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_type = attention_type
        self.sliding_window_size = sliding_window_size
        self.logit_soft_cap = logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon

        policy = self.dtype_policy
        self.query = Projection(
            "btd,ndh->btnh",
            output_shape=(None, num_query_heads, head_dim),
            dtype=policy,
            name="query",
        )
        self.key = Projection(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            dtype=policy,
            name="key",
        )
        self.value = Projection(
            "bsd,kdh->bskh",
            output_shape=(None, num_key_value_heads, head_dim),
            dtype=policy,
            name="value",
        )
        self.attention_output = Projection(
            "btnh,nhd->btd",
            output_shape=(None, hidden_dim),
            dtype=policy,
            name="attention_output",
        )
        if use_query_key_norm:
            self.query_norm = GemmaRMSNormalization(
                epsilon=layer_norm_epsilon, dtype=policy, name="query_norm"
            )
            self.key_norm = GemmaRMSNormalization(
                epsilon=layer_norm_epsilon, dtype=policy, name="key_norm"
            )
        self.rotary = RotaryEmbedding(
            max_wavelength=rope_max_wavelength,
            scaling_factor=rope_scaling_factor,
            dtype=policy,
            name="rotary",
        )

    def build(self, input_shape):
        self.query.build(input_shape)
        self.key.build(input_shape)
        self.value.build(input_shape)
        self.attention_output.build(
            tuple(input_shape[:-1]) + (self.num_query_heads, self.head_dim)
        )
        if self.use_query_key_norm:
            self.query_norm.build((None, None, None, self.head_dim))
            self.key_norm.build((None, None, None, self.head_dim))
        self.built = True

    def project_query_key_value(self, inputs, positions):
        """Returns `(queries, keys, values)` after norms and RoPE."""
        query = self.query(inputs)
        key = self.key(inputs)
        value = self.value(inputs)
        if self.use_query_key_norm:
            query = self.query_norm(query)
            key = self.key_norm(key)
        cos, sin = self.rotary.cos_sin(positions, self.head_dim)
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        return query, key, value

    def attend(self, query, keys, values, attention_mask):
        """Scaled dot-product attention of `query` over `keys`/`values`."""
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        groups = self.num_query_heads // self.num_key_value_heads
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        compute_dtype = query.dtype
        if storage_layout.is_half_precision(
            compute_dtype
        ) and storage_layout.multiplies_half_precision_slowly(query):
            # Also more exact: the logits are no longer rounded to 16 bits.
            # The barrier keeps XLA from fusing a cache's update into both
            # the stored cache and its float32 copy read here: it then
            # copied each whole cache every decode step to update it in
            # place (measured on JAX, 270M model in bfloat16+int8: 65 -> 68
            # tok/s with 144 cached tokens, 45 -> 57 with 2,048).
            keys, values = storage_layout.optimization_barrier(keys, values)
            query, keys, values = (
                ops.cast(tensor, "float32") for tensor in (query, keys, values)
            )
        if self.logit_soft_cap is None and _torch_on_cpu(query):
            outputs = _torch_fused_attention(query, keys, values, attention_mask)
        else:
            query = ops.reshape(
                query,
                (batch, length, self.num_key_value_heads, groups, self.head_dim),
            )
            outputs = self._attend_by_einsums(query, keys, values, attention_mask)
        outputs = ops.reshape(
            ops.cast(outputs, compute_dtype),
            (batch, length, self.num_query_heads, self.head_dim),
        )
        return self.attention_output(outputs)

    def _attend_by_einsums(self, query, keys, values, attention_mask):
        """`query` `(batch, length, kv_heads, groups, head_dim)` over the
        keys and values, without scaling."""
        logits = ops.einsum("btkgh,bskh->bkgts", query, keys)
        logits = ops.cast(logits, "float32")
        if self.logit_soft_cap is not None:
            cap = float(self.logit_soft_cap)
            logits = ops.tanh(logits / cap) * cap
        logits = ops.where(attention_mask[:, None, None, :, :], logits, _MASKED_LOGIT)
        probabilities = ops.cast(ops.softmax(logits, axis=-1), values.dtype)
        return ops.einsum("bkgts,bskh->btkgh", probabilities, values)

    def call(self, inputs, positions, attention_mask, cache=None, cache_index=None):
        query, key, value = self.project_query_key_value(inputs, positions)
        if cache is None:
            key_values = (key, value)
        else:
            key_cache, value_cache = cache
            key_values = (
                write_cache(key_cache, key, cache_index),
                write_cache(value_cache, value, cache_index),
            )
        outputs = self.attend(query, key_values[0], key_values[1], attention_mask)
        return outputs, key_values

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "attention_type": self.attention_type,
                "sliding_window_size": self.sliding_window_size,
                "logit_soft_cap": self.logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


def _torch_on_cpu(tensor):
    return keras.backend.backend() == "torch" and tensor.device.type == "cpu"


def _torch_fused_attention(query, keys, values, attention_mask):
    """`query` `(batch, length, heads, head_dim)` over `keys` and `values`
    `(batch, keys, kv_heads, head_dim)`, without scaling, by PyTorch's fused
    attention: one operation where the einsums are about 35, each replayed
    separately in a recorded decode step (the 270M model: 71 -> 56 us per
    layer and token). A query that may see no key gets zeros."""
    import torch

    outputs = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=torch.as_tensor(attention_mask)[:, None],
        scale=1.0,
        enable_gqa=True,
    )
    return outputs.transpose(1, 2)
