"""The dense projections of the Gemma blocks (attention and feed-forward)."""

import keras
from keras import ops


def default_quantization_config(mode, config):
    """Quantization settings of keras-gemma's layers.

    `"int8"` without a config quantizes the weights only: activations stay
    in floating point. That is more accurate than also quantizing the
    activations (Keras's default), and faster on CPUs, where XLA fuses the
    int8-to-float conversion into the matrix product while int8 x int8
    products are not vectorized.
    """
    if mode == "int8" and config is None:
        from keras.quantizers import Int8QuantizationConfig

        return Int8QuantizationConfig(activation_quantizer=None)
    return config


def _projection_as_matmul(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` as a matrix product that reads the
    kernel where it is stored, or `None` for an equation not listed here.

    `torch.einsum` permutes and copies kernels such as `(heads, hidden,
    head_dim)` on every call; when decoding one token that copy costs more
    than the product itself.
    """
    if equation in ("btd,ndh->btnh", "bsd,kdh->bskh"):
        batch, length, hidden = ops.shape(inputs)
        heads, _, head_dim = kernel.shape
        # One product per head: (1, b*t, d) @ (n, d, h) -> (n, b*t, h).
        flat = ops.reshape(inputs, (1, batch * length, hidden))
        outputs = ops.transpose(ops.matmul(flat, kernel), (1, 0, 2))
        return ops.reshape(outputs, (batch, length, heads, head_dim))
    if equation == "btnh,nhd->btd":
        batch, length, heads, head_dim = ops.shape(inputs)
        hidden = kernel.shape[-1]
        flat = ops.reshape(inputs, (batch * length, heads * head_dim))
        outputs = ops.matmul(flat, ops.reshape(kernel, (heads * head_dim, hidden)))
        return ops.reshape(outputs, (batch, length, hidden))
    if equation in ("btd,df->btf", "btf,fd->btd"):
        return ops.matmul(inputs, kernel)
    return None


@keras.saving.register_keras_serializable(package="keras_gemma")
class Projection(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with two changes for the Gemma blocks.

    The variables, LoRA and quantization are EinsumDense's. On PyTorch the
    float product runs as a plain (batched) matrix product that reads the
    kernel in place (see `_projection_as_matmul`); JAX and TensorFlow
    compile the einsum with XLA, which lays it out itself. And
    `quantize("int8")` without a config quantizes weights only (see
    `default_quantization_config`).

    Example:

    >>> import numpy as np
    >>> query = Projection("btd,ndh->btnh", output_shape=(None, 2, 4))
    >>> tuple(query(np.ones((1, 3, 8), "float32")).shape)
    (1, 3, 2, 4)
    """

    def call(self, inputs, training=None):
        outputs = None
        if keras.backend.backend() == "torch":
            outputs = _projection_as_matmul(self.equation, inputs, self.kernel)
        if outputs is None:
            outputs = ops.einsum(self.equation, inputs, self.kernel)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses unless told the subclass is ready.
        super().quantize(
            mode, type_check=False, config=default_quantization_config(mode, config)
        )
