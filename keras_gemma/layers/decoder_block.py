"""One Gemma transformer layer: attention then feed-forward, each residual."""

import keras

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.feedforward import GeGLUFeedForward
from keras_gemma.layers.rms_normalization import GemmaRMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaDecoderBlock(keras.layers.Layer):
    """Pre-norm attention and GeGLU feed-forward, with optional post-norms.

    `x + post_attention_norm(attention(pre_attention_norm(x)))`, then
    `x + post_ffw_norm(ffw(pre_ffw_norm(x)))`. Gemma 1 has no post-norms;
    Gemma 2 and 3 have both.

    Args:
        hidden_dim: model width.
        intermediate_dim: width of each feed-forward branch.
        use_post_attention_norm: normalize the attention output before the
            residual addition.
        use_post_ffw_norm: normalize the feed-forward output before the
            residual addition.
        layer_norm_epsilon: epsilon of every norm in the block.
        **attention_kwargs: the remaining arguments of `GemmaAttention`
            (heads, head size, attention type, window, soft-cap, ...).

    Call arguments and returns are those of `GemmaAttention`, with the
    block's output in place of the attention output.

    Example:

    >>> import numpy as np
    >>> block = GemmaDecoderBlock(hidden_dim=16, intermediate_dim=32,
    ...     num_query_heads=2, num_key_value_heads=1, head_dim=8,
    ...     query_pre_attn_scalar=8)
    >>> attention_mask = np.tril(np.ones((4, 4), dtype=bool))[None]
    >>> out, _ = block(np.ones((1, 4, 16), "float32"),
    ...                positions=np.arange(4)[None], attention_mask=attention_mask)
    >>> tuple(out.shape)
    (1, 4, 16)
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        layer_norm_epsilon=1e-6,
        **attention_kwargs,
    ):
        layer_kwargs = {
            key: attention_kwargs.pop(key)
            for key in ("name", "dtype", "trainable")
            if key in attention_kwargs
        }
        super().__init__(**layer_kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_kwargs = dict(attention_kwargs)

        policy = self.dtype_policy

        def norm(name):
            return GemmaRMSNormalization(
                epsilon=layer_norm_epsilon, dtype=policy, name=name
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = GemmaAttention(
            hidden_dim=hidden_dim,
            layer_norm_epsilon=layer_norm_epsilon,
            dtype=policy,
            name="attention",
            **attention_kwargs,
        )
        self.post_attention_norm = (
            norm("post_attention_norm") if use_post_attention_norm else None
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.ffw = GeGLUFeedForward(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            dtype=policy,
            name="ffw",
        )
        self.post_ffw_norm = norm("post_ffw_norm") if use_post_ffw_norm else None

    @property
    def attention_type(self):
        return self.attention.attention_type

    def build(self, input_shape):
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.ffw,
            self.post_ffw_norm,
        ):
            if layer is not None:
                layer.build(input_shape)
        self.built = True

    def call(self, inputs, positions, attention_mask, cache=None, cache_index=None):
        attended, key_values = self.attention(
            self.pre_attention_norm(inputs),
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            cache_index=cache_index,
        )
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        hidden = inputs + attended
        transformed = self.ffw(self.pre_ffw_norm(hidden))
        if self.post_ffw_norm is not None:
            transformed = self.post_ffw_norm(transformed)
        return hidden + transformed, key_values

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                **self.attention_kwargs,
            }
        )
        return config
