"""Gated feed-forward network with a tanh-approximated GELU (GeGLU)."""

import keras
from keras import ops

from keras_gemma.layers.projection import Projection


@keras.saving.register_keras_serializable(package="keras_gemma")
class GeGLUFeedForward(keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`, without biases.

    Args:
        hidden_dim: size of the input and output feature axis.
        intermediate_dim: size of each of the two branches.

    Example:

    >>> import numpy as np
    >>> ffw = GeGLUFeedForward(hidden_dim=8, intermediate_dim=16)
    >>> tuple(ffw(np.ones((2, 3, 8), dtype="float32")).shape)
    (2, 3, 8)
    """

    def __init__(self, hidden_dim, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.gate = Projection(
            "btd,df->btf",
            output_shape=(None, intermediate_dim),
            dtype=self.dtype_policy,
            name="gate",
        )
        self.up = Projection(
            "btd,df->btf",
            output_shape=(None, intermediate_dim),
            dtype=self.dtype_policy,
            name="up",
        )
        self.down = Projection(
            "btf,fd->btd",
            output_shape=(None, hidden_dim),
            dtype=self.dtype_policy,
            name="down",
        )

    def build(self, input_shape):
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, inputs):
        gate = ops.gelu(self.gate(inputs), approximate=True)
        return self.down(gate * self.up(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
            }
        )
        return config
