"""The dense projections of the Gemma blocks (attention and feed-forward)."""

import keras
from keras import ops

# Equations whose kernel is `(heads, hidden, head_dim)`: the contracted axis
# sits between the two kept ones, so no reshape makes it a plain matrix.
_PER_HEAD_EQUATIONS = ("btd,ndh->btnh", "bsd,kdh->bskh")


def _per_head_product(inputs, kernel):
    """`(b, t, d) x (n, d, h) -> (b, t, n, h)` as one batched product over
    the heads, reading the kernel where it is stored.

    A single matrix product would need the kernel as `(d, n * h)`: XLA and
    `torch.einsum` then copy the whole kernel on every call, which costs
    several times the product itself when decoding a token (measured on
    JAX: 18 query kernels of the 270M model in 29 ms by einsum, 3 ms as a
    batched product). The inputs are broadcast over the heads instead; on
    JAX an optimization barrier keeps XLA from folding that broadcast back
    into the einsum form.
    """
    batch, length, hidden = ops.shape(inputs)
    heads, _, head_dim = kernel.shape
    flat = ops.reshape(inputs, (1, batch * length, hidden))
    backend = keras.backend.backend()
    if backend != "torch":  # torch's matmul broadcasts without a copy
        flat = ops.broadcast_to(flat, (heads, batch * length, hidden))
    if backend == "jax":
        import jax

        flat = jax.lax.optimization_barrier(flat)
    outputs = ops.transpose(ops.matmul(flat, kernel), (1, 0, 2))
    return ops.reshape(outputs, (batch, length, heads, head_dim))


def projection_as_matmul(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` as a matrix product that reads the
    kernel where it is stored, or `None` where the einsum is better.

    Per-head kernels use `_per_head_product` when the rows (batch times
    length) are at most `head_dim`: then broadcasting the inputs over the
    heads moves fewer bytes than copying the kernel, as in decoding. On
    PyTorch, which needs no broadcast copy, they always do.
    """
    if equation in _PER_HEAD_EQUATIONS:
        batch, length, _ = ops.shape(inputs)
        head_dim = kernel.shape[-1]
        is_torch = keras.backend.backend() == "torch"
        if is_torch or (
            isinstance(batch, int)
            and isinstance(length, int)
            and batch * length <= head_dim
        ):
            return _per_head_product(inputs, kernel)
        return None
    if equation == "btnh,nhd->btd":
        batch, length, heads, head_dim = ops.shape(inputs)
        hidden = kernel.shape[-1]
        flat = ops.reshape(inputs, (-1, heads * head_dim))
        outputs = ops.matmul(flat, ops.reshape(kernel, (heads * head_dim, hidden)))
        return ops.reshape(outputs, (batch, length, hidden))
    if equation in ("btd,df->btf", "btf,fd->btd"):
        return ops.matmul(inputs, kernel)
    return None


def _single_row_product(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` for a single row (batch and length
    1) as a broadcast multiply and a sum over the contracted axes.

    For int8 weights, XLA on CPU fuses the conversion into this reduction,
    reading one byte per weight; a matrix-vector product of a converted
    kernel writes the whole float32 kernel first (about 10x slower than
    float32 for the 270M model's feed-forward kernels, measured). The input
    is laid out as a column first: with a row vector XLA fuses the chain of
    layers poorly (another 20x).
    """
    if equation in ("btd,df->btf", "btf,fd->btd"):
        column = ops.reshape(inputs, (-1, 1))
        return ops.reshape(ops.sum(column * kernel, axis=0), (1, 1, -1))
    if equation in _PER_HEAD_EQUATIONS:
        column = ops.reshape(inputs, (1, -1, 1))
        outputs = ops.sum(column * kernel, axis=1)
        return ops.reshape(outputs, (1, 1) + tuple(outputs.shape))
    if equation == "btnh,nhd->btd":
        column = ops.reshape(inputs, tuple(kernel.shape[:2]) + (1,))
        return ops.reshape(ops.sum(column * kernel, axis=(0, 1)), (1, 1, -1))
    return None


@keras.saving.register_keras_serializable(package="keras_gemma")
class Projection(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` computed as matrix products.

    The variables, LoRA and quantization are EinsumDense's; only how the
    product is computed changes. The float product, and the int8 product
    when only the weights are quantized, run as (batched) matrix products
    that read the kernel where it is stored (see `projection_as_matmul`);
    a single int8 row uses `_single_row_product`, whose conversion XLA
    fuses into the reduction.

    Example:

    >>> import numpy as np
    >>> query = Projection("btd,ndh->btnh", output_shape=(None, 2, 4))
    >>> tuple(query(np.ones((1, 3, 8), "float32")).shape)
    (1, 3, 2, 4)
    """

    def call(self, inputs, training=None):
        outputs = self._product(inputs, self.kernel)
        return self._finish(outputs)

    def _product(self, inputs, kernel):
        outputs = projection_as_matmul(self.equation, inputs, kernel)
        if outputs is None:
            outputs = ops.einsum(self.equation, inputs, kernel)
        return outputs

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _int8_call(self, inputs, training=None):
        if self.inputs_quantizer is not None or self.lora_enabled:
            return super()._int8_call(inputs, training=training)
        # Weights only: the kernel scale is laid out to divide the outputs.
        kernel = ops.cast(self._kernel, self.compute_dtype)
        outputs = None
        rows = ops.shape(inputs)[0], ops.shape(inputs)[1]
        if keras.backend.backend() != "torch" and rows == (1, 1):
            outputs = _single_row_product(self.equation, inputs, kernel)
        if outputs is None:
            outputs = self._product(inputs, kernel)
        outputs = ops.divide(outputs, ops.cast(self.kernel_scale, outputs.dtype))
        return self._finish(outputs)

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses unless told the subclass is ready.
        super().quantize(mode, type_check=False, config=config)
