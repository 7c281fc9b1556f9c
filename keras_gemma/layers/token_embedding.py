"""Token embedding shared between the model's input and its output logits."""

import math

import keras
from keras import ops

from keras_gemma.layers import storage_layout


@keras.saving.register_keras_serializable(package="keras_gemma")
class TiedTokenEmbedding(keras.layers.ReversibleEmbedding):
    """Token embedding tied with the output projection.

    Built on Keras's `ReversibleEmbedding`, so LoRA and int8/int4
    quantization of the table work in both directions. On the way in,
    looked-up rows are multiplied by `sqrt(output_dim)`; the factor is cast
    to the compute dtype first, as the reference does. On the way out
    (`reverse=True`), hidden states are multiplied by the transposed table
    and returned as float32 logits, optionally soft-capped as
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
        # The soft-cap is applied here, in float32, not by the parent class.
        kwargs.pop("tie_weights", None)
        kwargs.pop("reverse_dtype", None)
        super().__init__(
            input_dim, output_dim, tie_weights=True, logit_soft_cap=None, **kwargs
        )
        self.final_logit_soft_cap = logit_soft_cap

    def build(self, input_shape=None):
        if storage_layout.is_half_precision(self.compute_dtype):
            return super().build(input_shape)
        # Stored column-major in float32 on PyTorch: the output projection
        # then reads the table as a row-major `(hidden, vocabulary)` matrix,
        # a product MKL runs about twice as fast per token as the transposed
        # one. In 16 bits the row-major table is the fast one.
        initializer = self.embeddings_initializer
        self.embeddings_initializer = storage_layout.initializer_with_memory_order(
            initializer, (1, 0)
        )
        try:
            super().build(input_shape)
        finally:
            self.embeddings_initializer = initializer

    def call(self, inputs, reverse=False):
        if not reverse:
            return self._finish(super().call(inputs), reverse)
        rows = ops.reshape(inputs, (-1, self.output_dim))
        table = ops.convert_to_tensor(self.embeddings)
        if storage_layout.is_half_precision(table.dtype) and (
            storage_layout.is_xla_on_cpu()
        ):
            # XLA on CPU multiplies 16-bit floats one element at a time; in
            # float32 it converts the table as it reads it (JAX, bfloat16
            # decode of the 270M model: 15 -> 30 tok/s).
            logits = storage_layout.rows_times_converted_transpose(
                ops.cast(rows, "float32"), table, "float32"
            )
        else:
            # `storage_layout` splits a few float32 rows over PyTorch's
            # threads (the parent's `matmul` runs on one).
            logits = storage_layout.rows_times_transpose(rows, table)
        logits = ops.reshape(logits, tuple(ops.shape(inputs)[:-1]) + (-1,))
        return self._finish(logits, reverse)

    def quantized_call(self, inputs, reverse=False):
        return self._finish(super().quantized_call(inputs, reverse=reverse), reverse)

    def _int8_call(self, inputs, reverse=False):
        if not reverse or self.inputs_quantizer is not None:
            return super()._int8_call(inputs, reverse=reverse)
        # Weights only: the rows times the converted table, transposed, which
        # XLA on CPU computes reading one byte per weight (measured: 10.7 ms
        # against 57 ms per token for the 270M model by Keras's mixed
        # int8-float product, 30 ms in float32).
        rows = storage_layout.rows_times_converted_transpose(
            ops.reshape(inputs, (-1, self.output_dim)),
            self._embeddings.value,
            self.compute_dtype,
            divisor=ops.reshape(self.embeddings_scale, (-1,)),
        )
        return ops.reshape(rows, tuple(ops.shape(inputs)[:-1]) + (-1,))

    def quantize(self, mode=None, type_check=True, config=None):
        # The parent refuses subclasses unless told the subclass is ready.
        super().quantize(mode, type_check=False, config=config)

    def _finish(self, outputs, reverse):
        if not reverse:
            return outputs * ops.cast(math.sqrt(self.output_dim), outputs.dtype)
        logits = ops.cast(outputs, "float32")
        if self.final_logit_soft_cap is not None:
            cap = float(self.final_logit_soft_cap)
            logits = ops.tanh(logits / cap) * cap
        return logits

    def compute_output_spec(self, inputs, reverse=False):
        spec = super().compute_output_spec(inputs, reverse=reverse)
        if reverse:
            return keras.KerasTensor(spec.shape, dtype="float32")
        return spec

    def get_config(self):
        config = super().get_config()
        for key in ("tie_weights", "reverse_dtype"):
            config.pop(key, None)
        config["logit_soft_cap"] = self.final_logit_soft_cap
        return config
