"""Token embedding shared between the model's input and its output logits."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class TiedTokenEmbedding(keras.layers.Embedding):
    """Token embedding tied with the output projection.

    On the way in, looked-up rows are multiplied by `sqrt(output_dim)`; the
    factor is cast to the compute dtype first, as the reference does. On the
    way out (`reverse=True`), hidden states are multiplied by the transposed
    table to give vocabulary logits, optionally soft-capped as
    `cap * tanh(logits / cap)` in float32.

    Args:
        input_dim: vocabulary size.
        output_dim: hidden size.
        logit_soft_cap: the final logit soft-cap, or `None`.

    Example:

    >>> import numpy as np
    >>> embedding = TiedTokenEmbedding(input_dim=10, output_dim=4)
    >>> hidden = embedding(np.array([[1, 2, 3]]))
    >>> tuple(embedding(hidden, reverse=True).shape)
    (1, 3, 10)
    """

    def __init__(self, input_dim, output_dim, logit_soft_cap=None, **kwargs):
        kwargs.setdefault(
            "embeddings_initializer",
            keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
        )
        super().__init__(input_dim, output_dim, **kwargs)
        self.logit_soft_cap = logit_soft_cap

    def call(self, inputs, reverse=False):
        if reverse:
            return self.project(inputs)
        embedded = super().call(inputs)
        scale = ops.cast(math.sqrt(self.output_dim), embedded.dtype)
        return embedded * scale

    def project(self, hidden):
        """Maps hidden states `(..., output_dim)` to float32 logits."""
        table = ops.cast(self.embeddings, hidden.dtype)
        logits = ops.matmul(hidden, ops.transpose(table))
        logits = ops.cast(logits, "float32")
        if self.logit_soft_cap is not None:
            cap = float(self.logit_soft_cap)
            logits = ops.tanh(logits / cap) * cap
        return logits

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return tuple(input_shape[:-1]) + (self.input_dim,)
        return super().compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"logit_soft_cap": self.logit_soft_cap})
        return config
