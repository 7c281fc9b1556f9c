"""The dense projections of the Gemma blocks (attention and feed-forward)."""

import keras
from keras import ops

from keras_gemma.layers import storage_layout

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
    backend = keras.backend.backend()
    if backend == "torch":
        matrix = _torch_heads_as_columns(kernel)
        if matrix is not None:
            rows = ops.reshape(inputs, (batch * length, hidden))
            outputs = storage_layout.rows_times_matrix(rows, matrix)
            return ops.reshape(outputs, (batch, length, heads, head_dim))
    flat = ops.reshape(inputs, (1, batch * length, hidden))
    if backend != "torch":  # torch's matmul broadcasts without a copy
        flat = ops.broadcast_to(flat, (heads, batch * length, hidden))
    if backend == "jax":  # measured on JAX only
        (flat,) = storage_layout.optimization_barrier(flat)
    outputs = ops.transpose(ops.matmul(flat, kernel), (1, 0, 2))
    return ops.reshape(outputs, (batch, length, heads, head_dim))


def _torch_heads_as_columns(kernel):
    """A `(heads, hidden, head_dim)` kernel as a `(hidden, heads * head_dim)`
    view on PyTorch (possible when stored with `hidden` innermost, as
    `Projection` does), or `None` where that would need a copy."""
    heads, hidden, head_dim = kernel.shape
    kernel = ops.convert_to_tensor(kernel)
    try:
        return kernel.permute(1, 0, 2).view(hidden, heads * head_dim)
    except RuntimeError:
        return None


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
        matrix = ops.reshape(kernel, (heads * head_dim, hidden))
        outputs = storage_layout.rows_times_matrix(flat, matrix)
        return ops.reshape(outputs, (batch, length, hidden))
    if equation in ("btd,df->btf", "btf,fd->btd"):
        batch, length, features = ops.shape(inputs)
        flat = ops.reshape(inputs, (-1, features))
        outputs = storage_layout.rows_times_matrix(flat, kernel)
        return ops.reshape(outputs, (batch, length, kernel.shape[-1]))
    return None


@keras.saving.register_keras_serializable(package="keras_gemma")
class Projection(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` computed as matrix products.

    The variables, LoRA and quantization are EinsumDense's, with two
    changes to how they are stored and multiplied:

    - the float product, and the int8 product when only the weights are
      quantized, run as (batched) matrix products that read the kernel
      where it is stored (see `projection_as_matmul`);
    - an int8 kernel is stored with its contracted axes last, transposed
      from EinsumDense's layout (the `kernel` property still returns
      EinsumDense's layout), so that with only the weights quantized the
      product is `rows @ transpose(kernel)` over the kernel as stored; XLA
      on CPU then converts each weight as it reads it, one byte per weight
      (see `storage_layout.rows_times_converted_transpose`).

    On PyTorch, a float kernel is also stored with its contracted axes
    innermost, in memory only (see `storage_layout`).

    Example:

    >>> import numpy as np
    >>> query = Projection("btd,ndh->btnh", output_shape=(None, 2, 4))
    >>> inputs = np.ones((1, 3, 8), "float32")
    >>> tuple(query(inputs).shape)
    (1, 3, 2, 4)
    >>> query.quantize("int8")
    >>> tuple(query._kernel.shape), tuple(query.kernel.shape)
    ((2, 4, 8), (2, 8, 4))
    """

    def add_weight(self, *args, **kwargs):
        if (
            kwargs.get("name") == "kernel"
            and kwargs.get("dtype") != "int8"  # int8 kernels are transposed
        ):
            kwargs["initializer"] = storage_layout.initializer_with_memory_order(
                kwargs.get("initializer"),
                storage_layout.contracted_axes_innermost(self.equation),
            )
        return super().add_weight(*args, **kwargs)

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

    # -- int8, stored with the contracted axes last ---------------------------

    @property
    def _int8_order(self):
        """The stored int8 kernel's axes, as axes of EinsumDense's kernel."""
        return storage_layout.contracted_axes_innermost(self.equation)

    @property
    def _int8_equation(self):
        """The einsum equation over the stored int8 kernel."""
        operands, output = self.equation.split("->")
        inputs, kernel = operands.split(",")
        stored = "".join(kernel[axis] for axis in self._int8_order)
        return f"{inputs},{stored}->{output}"

    def _int8_as_einsum_layout(self, stored):
        return ops.transpose(stored, storage_layout.inverse_order(self._int8_order))

    def _int8_build(self, kernel_shape, config=None):
        super()._int8_build(kernel_shape, config)
        if getattr(self, "_int8_build_as_einsum_dense", False):
            return  # `quantize` assigns EinsumDense's layout, then transposes
        self._replace_int8_kernel(None)

    def _replace_int8_kernel(self, value):
        """Recreates the int8 kernel in the stored layout, holding `value`
        (EinsumDense's layout) or zeros."""
        shape = tuple(self._kernel.shape[axis] for axis in self._int8_order)
        if value is not None:
            value = ops.transpose(value, self._int8_order)
        del self._kernel
        self._kernel = self.add_weight(
            name="kernel",
            shape=shape,
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        if value is not None:
            self._kernel.assign(value)

    def quantize(self, mode=None, type_check=True, config=None):
        # EinsumDense refuses subclasses unless told the subclass is ready.
        self._int8_build_as_einsum_dense = True
        try:
            super().quantize(mode, type_check=False, config=config)
        finally:
            self._int8_build_as_einsum_dense = False
        if mode == "int8":
            self._replace_int8_kernel(self._kernel.value)

    @property
    def kernel(self):
        if self.quantization_mode != "int8" or not self.built:
            return super().kernel
        kernel = self._int8_as_einsum_layout(self._kernel)
        if self.lora_enabled:
            kernel = ops.cast(
                kernel
                + self._lora_scale * ops.matmul(self.lora_kernel_a, self.lora_kernel_b),
                self.compute_dtype,
            )
        return kernel

    @property
    def _lora_scale(self):
        return self.lora_alpha / self.lora_rank

    def _int8_call(self, inputs, training=None):
        if self.inputs_quantizer is not None:
            kernel = self._int8_as_einsum_layout(self._kernel)
            outputs = self._int8_activations_product(inputs, kernel)
        else:
            outputs = self._int8_weights_only_product(inputs)
        if self.lora_enabled:
            adapted = ops.einsum(self.equation, inputs, self.lora_kernel_a)
            adapted = ops.matmul(adapted, self.lora_kernel_b)
            outputs = ops.cast(outputs + self._lora_scale * adapted, self.compute_dtype)
        return self._finish(outputs)

    @property
    def _int8_contracted_count(self):
        """How many trailing axes of the stored int8 kernel are summed over."""
        operands, output = self.equation.split("->")
        return sum(letter not in output for letter in operands.split(",")[1])

    @property
    def _int8_is_matrix_product(self):
        """Whether the product with the stored int8 kernel is a plain matrix
        product `rows @ transpose(kernel)` once both are flattened: the
        inputs end with the kernel's contracted axes, in the same order, and
        the outputs are the inputs' other axes followed by the kernel's."""
        operands, output = self._int8_equation.split("->")
        inputs, stored = operands.split(",")
        count = self._int8_contracted_count
        return (
            inputs[-count:] == stored[-count:]
            and output == inputs[:-count] + stored[:-count]
        )

    def _int8_weights_only_product(self, inputs):
        """The inputs times the int8 kernel, divided by the kernel scale
        (laid out to divide the outputs)."""
        kernel = self._kernel.value
        scale = self.kernel_scale
        if not self._int8_is_matrix_product:
            kernel, inputs = storage_layout.converted_where_used(
                kernel, inputs, self.compute_dtype
            )
            if keras.backend.backend() == "torch":  # a transposed view is free
                outputs = self._product(inputs, self._int8_as_einsum_layout(kernel))
            else:
                outputs = ops.einsum(self._int8_equation, inputs, kernel)
            return ops.divide(outputs, ops.cast(scale, outputs.dtype))
        count = self._int8_contracted_count
        contracted = tuple(kernel.shape[-count:])
        rows = storage_layout.rows_times_converted_transpose(
            ops.reshape(inputs, (-1,) + contracted),
            ops.reshape(kernel, (-1,) + contracted),
            self.compute_dtype,
            divisor=ops.reshape(scale, (-1,)),
        )
        leading = ops.shape(inputs)[: len(inputs.shape) - count]
        return ops.reshape(rows, tuple(leading) + tuple(kernel.shape[:-count]))

    def _int8_activations_product(self, inputs, kernel):
        """The product with int8 inputs too (Keras's default int8 mode); the
        inputs' gradient is computed through the dequantized kernel."""
        kernel_scale = ops.convert_to_tensor(self.kernel_scale)

        @ops.custom_gradient
        def product(inputs, kernel, kernel_scale):
            def gradient(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                scale = self._adjust_scale_for_dequant(kernel_scale)
                dequantized = ops.divide(ops.cast(kernel, self.compute_dtype), scale)
                equation = self._custom_gradient_equation
                return ops.einsum(equation, upstream, dequantized), None, None

            quantized, inputs_scale = self.inputs_quantizer(
                inputs, axis=self.quantization_axis
            )
            inputs_scale = self._adjust_scale_for_quant(inputs_scale, "input")
            outputs = ops.cast(
                ops.einsum(self.equation, quantized, kernel), self.compute_dtype
            )
            return ops.divide(outputs, inputs_scale * kernel_scale), gradient

        return product(inputs, kernel, kernel_scale)

    def _get_kernel_with_merged_lora(self):
        if self.quantization_mode != "int8" or not self.lora_enabled:
            return super()._get_kernel_with_merged_lora()
        scale = self._adjust_scale_for_dequant(self.kernel_scale)
        merged = ops.divide(
            ops.cast(self._int8_as_einsum_layout(self._kernel), self.compute_dtype),
            scale,
        ) + self._lora_scale * ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        kernel, scale = keras.quantizers.abs_max_quantize(
            merged, axis=self._kernel_reduced_axes, to_numpy=True
        )
        scale = self._adjust_scale_for_quant(scale, "kernel")
        return ops.transpose(kernel, self._int8_order), scale, None
