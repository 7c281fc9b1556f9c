"""How weights are laid out in memory on PyTorch, for fast decoding.

Decoding multiplies one row by each weight matrix, and on CPU PyTorch's
speed for that depends on the weight's memory layout, differently per dtype
(measured on the 2-core machines, one row times a 640 x 2,048 kernel):

- bfloat16 and float16 have no BLAS matrix-vector product; PyTorch's own
  kernel is fast only when each output is a dot product over contiguous
  memory, that is with the contracted axis innermost: 0.2 ms, against 5.9
  ms with Keras's default `(in, out)` row-major kernel (1.4 s against 36
  ms for the 270M model's output projection over the vocabulary);
- float32 goes to MKL, which multiplies a few rows on one thread only;
  `rows_times_matrix` splits such products over the threads, which is
  fastest for the layers' kernels with the contracted axis innermost too,
  and for the vocabulary table column-major.

A layout chosen at build time lasts: PyTorch's `copy_` (every Keras
`assign`, so every checkpoint load) and `.to(dtype)` (the autocast of
mixed precision) keep a tensor's strides. Other backends ignore it.
"""

import math
import threading
import warnings

import keras
import numpy as np


def is_half_precision(dtype):
    """Whether `dtype` is a 16-bit float (`"bfloat16"`, `"float16"`)."""
    return keras.backend.standardize_dtype(dtype) in ("bfloat16", "float16")


def contracted_axes_innermost(equation):
    """The memory order (outermost first) of an einsum kernel's axes that
    puts the axes summed over innermost, the rest keeping their order.

    >>> contracted_axes_innermost("btd,df->btf")
    (1, 0)
    >>> contracted_axes_innermost("btnh,nhd->btd")
    (2, 0, 1)
    >>> contracted_axes_innermost("btd,ndh->btnh")
    (0, 2, 1)
    """
    operands, output = equation.split("->")
    kernel = operands.split(",")[1]
    kept = [axis for axis, letter in enumerate(kernel) if letter in output]
    contracted = [axis for axis, letter in enumerate(kernel) if letter not in output]
    return tuple(kept + contracted)


def inverse_order(order):
    """The permutation that undoes `order`.

    >>> inverse_order((2, 0, 1))
    (1, 2, 0)
    """
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def initializer_with_memory_order(initializer, order):
    """`initializer`, returning tensors stored with their axes in `order`
    (outermost first) on PyTorch; unchanged on other backends or where
    `order` is the natural one."""
    initializer = keras.initializers.get(initializer)
    if keras.backend.backend() != "torch" or tuple(order) == tuple(range(len(order))):
        return initializer
    inverse = inverse_order(order)

    def initialize(shape, dtype=None):
        value = initializer(shape, dtype=dtype)
        # A numpy array may be someone else's memory: always copied. A
        # tensor (a random initializer's, or a loader's own) is kept if it
        # is already stored in `order`.
        copied = isinstance(value, np.ndarray)
        stored = as_torch_tensor(value).permute(order)
        torch_dtype = _torch_dtype(dtype or keras.backend.floatx())
        device = keras.ops.convert_to_tensor(0).device
        if (
            not copied
            and stored.is_contiguous()
            and stored.dtype == torch_dtype
            and stored.device == device
        ):
            return value
        copy = stored.new_empty(stored.shape, dtype=torch_dtype, device=device)
        return copy_in_blocks(copy, stored).permute(inverse)

    # Read by checkpoint loading, which replaces a variable's initializer
    # with the loaded value and must keep the layout.
    initialize.memory_order = tuple(order)
    return initialize


def as_torch_tensor(value):
    """`value` as a PyTorch tensor, sharing a numpy array's memory (with
    its strides), for a caller that copies it or owns it.

    Keras's `convert_to_tensor` copies numpy arrays (C order, so a
    transposed view twice over): loading the 270M model's 1 GB of float32
    weights took 0.8 s more through it.

    Example:

    >>> import numpy as np
    >>> if keras.backend.backend() == "torch":
    ...     array = np.zeros((2, 3), "float32")
    ...     assert as_torch_tensor(array.T).stride() == (1, 3)
    """
    import torch

    if not isinstance(value, np.ndarray):
        return keras.ops.convert_to_tensor(value)
    if any(stride < 0 for stride in value.strides):  # PyTorch has none
        value = np.ascontiguousarray(value)
    if keras.backend.standardize_dtype(value.dtype) == "bfloat16":
        # numpy's bfloat16 (ml_dtypes) is unknown to PyTorch: same bits.
        return as_torch_tensor(value.view(np.uint16)).view(torch.bfloat16)
    with warnings.catch_warnings():
        # Only read, never written: a read-only array (a memory-mapped
        # checkpoint) is fine.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


# Columns per block when a copy transposes (see `copy_in_blocks`).
_TRANSPOSE_BLOCK = 256


def copy_in_blocks(target, source):
    """Copies `source` into `target` (both numpy arrays or both PyTorch
    tensors, same shape), `_TRANSPOSE_BLOCK` innermost positions at a time
    when `source` is strided there (a transposed view): each block's source
    rows then stay in cache while they are written out. Measured on the
    270M model's vocabulary table (671 MB) made column-major: PyTorch 0.59
    -> 0.37 s, numpy 1.2 -> 0.3 s. Returns `target`.

    Example:

    >>> import numpy as np
    >>> source = np.arange(6.0).reshape(2, 3)
    >>> copy_in_blocks(np.empty((3, 2)), source.T).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    on_numpy = isinstance(target, np.ndarray)

    def copy(into, values):
        if on_numpy:
            np.copyto(into, values)
        else:
            into.copy_(values)

    if source.ndim == 0 or _innermost_is_contiguous(source):
        copy(target, source)
        return target
    for begin in range(0, source.shape[-1], _TRANSPOSE_BLOCK):
        end = begin + _TRANSPOSE_BLOCK
        copy(target[..., begin:end], source[..., begin:end])
    return target


def _innermost_is_contiguous(array):
    """Whether neighbours along the last axis of `array` (numpy or PyTorch,
    at least 1-D) are neighbours in memory."""
    if isinstance(array, np.ndarray):
        return array.strides[-1] == array.itemsize
    return array.stride(-1) == 1


def _torch_dtype(dtype):
    import torch

    return getattr(torch, keras.backend.standardize_dtype(dtype))


def converted_where_used(weight, inputs, dtype):
    """`weight` cast to `dtype`, for a product with `inputs`, without XLA
    hoisting the conversion out of a decode loop.

    Inside a `while` loop XLA moves a loop-invariant conversion before the
    loop, which writes a float copy of every int8 weight and then reads that
    copy at every step (measured on JAX for the 270M model's output
    projection: 65 ms per step against 14 ms with the conversion fused into
    the product). An optimization barrier shared with `inputs`, which change
    every step, keeps it inside; TensorFlow's (from its XLA bridge, as Keras
    uses for `dynamic_update_slice`) likewise (hoisting measured on
    TensorFlow: the decode loop read float32 copies of all the int8
    weights). Off the CPU, TensorFlow adds to the weight a zero that XLA
    cannot prove zero, computed from `inputs`, instead: that addition runs
    for every weight read (on CPU, bfloat16+int8 decode 53 tok/s with it,
    63 with the barrier), but needs no operation that TensorFlow might lack
    a kernel for without XLA. Returns `(converted_weight, inputs)`.
    """
    if _has_optimization_barrier():
        weight, inputs = optimization_barrier(weight, inputs)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            first = keras.ops.reshape(inputs, (-1,))[0]
            zero = keras.ops.minimum(keras.ops.abs(first), 0)
            weight = weight + keras.ops.cast(zero, weight.dtype)
    return keras.ops.cast(weight, dtype), inputs


def optimization_barrier(*tensors):
    """`tensors`, unchanged, behind XLA's optimization barrier where there
    is one to put (JAX; TensorFlow tracing a function for CPU), which keeps
    XLA from moving or fusing computations across it; elsewhere as given.
    Returns a tuple.

    Example:

    >>> import numpy as np
    >>> keys, values = optimization_barrier(np.ones(2), np.zeros(2))
    >>> keras.ops.convert_to_numpy(keys).tolist()
    [1.0, 1.0]
    """
    if not _has_optimization_barrier():
        return tensors
    if keras.backend.backend() == "jax":
        import jax

        return tuple(jax.lax.optimization_barrier(tensors))
    return tuple(_tensorflow_optimization_barrier(*tensors))


def _has_optimization_barrier():
    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly() and is_xla_on_cpu()
    return False


def _tensorflow_optimization_barrier(*tensors):
    """XLA's optimization barrier on TensorFlow, passing gradients through
    (TensorFlow registers none for it)."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    @tf.custom_gradient
    def barrier(*tensors):
        def gradient(*upstream):
            return upstream

        return xla.optimization_barrier(*tensors), gradient

    return barrier(*tensors)


# Up to this many rows, XLA multiplies by a converted int8 weight without
# writing the converted weight: one row at a time, or on JAX from
# `_MIN_ROWS_SUMMED_TOGETHER` rows as one summed elementwise product (see
# `rows_times_converted_transpose`).
_MAX_ROWS_ONE_AT_A_TIME = 16
_MIN_ROWS_SUMMED_TOGETHER = 3
# PyTorch converts a weight this many elements at a time (5 MB in float32).
_TORCH_CONVERSION_CHUNK = 2048 * 640


def rows_times_matrix(rows, matrix):
    """`rows @ matrix` for a 2D `rows` `(n, k)` and `matrix` `(k, m)`.

    PyTorch multiplies a few float32 rows on CPU through MKL on one thread
    only. There, up to `_MAX_ROWS_ONE_AT_A_TIME` rows are multiplied by as
    many column blocks of `matrix` as PyTorch has threads, as one batched
    product (which runs the blocks in parallel) over views of `matrix`.
    Measured on the 2-core machines, one row in float32: a 640 x 2,048
    kernel stored with the contracted axis innermost 392 -> 231 us, a
    2,048 x 640 one 277 -> 185 us, the 270M model's vocabulary table
    (column-major) 28 -> 20 ms. 16-bit products already use every thread.

    Example:

    >>> import numpy as np
    >>> rows, matrix = np.ones((1, 3), "float32"), np.ones((3, 4), "float32")
    >>> keras.ops.convert_to_numpy(rows_times_matrix(rows, matrix)).tolist()
    [[3.0, 3.0, 3.0, 3.0]]
    """
    if keras.backend.backend() == "torch":
        rows = keras.ops.convert_to_tensor(rows)
        matrix = keras.ops.convert_to_tensor(matrix)
    blocks = _torch_thread_blocks(rows, matrix)
    if blocks is None:
        return keras.ops.matmul(rows, matrix)
    count, contracted = rows.shape
    width = matrix.shape[1] // blocks
    stacked = matrix.reshape(contracted, blocks, width).permute(1, 0, 2)
    products = rows.expand(blocks, count, contracted).bmm(stacked)
    return products.permute(1, 0, 2).reshape(count, blocks * width)


def rows_times_transpose(rows, matrix):
    """`rows @ transpose(matrix)` for a 2D `rows` `(n, k)` and `matrix`
    `(m, k)`, such as hidden states times a `(vocabulary, hidden)` table.

    TensorFlow's own matrix product (without XLA) is slow for a few rows
    times a transposed matrix: 2 to 15 rows times the 270M model's table
    took 700 ms, one row 19 ms. There it is computed as
    `transpose(matrix @ transpose(rows))` (52 ms for 2 to 16 rows, and no
    slower for more; the same under XLA), with plain products as its
    gradients (`_tensorflow_rows_times_transpose`). Elsewhere as
    `rows_times_matrix`.

    Example:

    >>> import numpy as np
    >>> rows, matrix = np.ones((2, 3), "float32"), np.ones((4, 3), "float32")
    >>> tuple(keras.ops.shape(rows_times_transpose(rows, matrix)))
    (2, 4)
    """
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_rows_times_transpose(rows, matrix)
    return rows_times_matrix(rows, keras.ops.transpose(matrix))


def _tensorflow_rows_times_transpose(rows, matrix):
    """`rows_times_transpose` on TensorFlow, with its gradients as plain
    products: TensorFlow's own gradient of the transposed form multiplies
    the upstream gradient by the transposed matrix (the 270M model's table
    in a rank-4 LoRA step on 64 tokens: 291 ms, against 158 ms as
    `upstream @ matrix`)."""
    import tensorflow as tf

    @tf.custom_gradient
    def product(rows, matrix):
        def gradient(upstream):
            return (
                tf.matmul(upstream, matrix),
                tf.matmul(upstream, rows, transpose_a=True),
            )

        return tf.transpose(tf.matmul(matrix, rows, transpose_b=True)), gradient

    # Promoted to one dtype as `ops.matmul` does (float16 rows of a mixed
    # precision model times a float32 table: float32).
    dtype = keras.backend.result_type(rows.dtype, matrix.dtype)
    return product(keras.ops.cast(rows, dtype), keras.ops.cast(matrix, dtype))


def _torch_thread_blocks(rows, matrix):
    """How many column blocks `rows_times_matrix` splits `matrix` into on
    PyTorch, or `None` where a single product is as fast."""
    if keras.backend.backend() != "torch":
        return None
    import torch

    blocks = torch.get_num_threads()
    if (
        blocks < 2
        or rows.device.type != "cpu"
        or rows.dtype != torch.float32
        or matrix.dtype != torch.float32
        or not 1 <= rows.shape[0] <= _MAX_ROWS_ONE_AT_A_TIME
        or matrix.shape[1] % blocks
    ):
        return None
    return blocks


def rows_times_converted_transpose(rows, weight, dtype, divisor=None):
    """`rows @ transpose(cast(weight, dtype))` for a 2D `rows` `(n, k)` and
    a low-precision `weight` `(m, k)`, reading `weight` where it is stored.
    The contracted axis `k` may be several axes: `rows` `(n, *axes)` and
    `weight` `(m, *axes)` (such as the heads and head size of an attention
    output projection) give `(n, m)`, summed over `axes`. With a `divisor`
    `(m,)` (an int8 weight's scales), each output is divided by its own, in
    `dtype`.

    On XLA for CPU, a single row times the transposed converted weight
    compiles to one loop that converts each weight as it reads it, one byte
    per int8 weight; any other form (an einsum over the stored axes, a
    product of several rows) first writes the whole weight converted, four
    bytes per weight. Measured on JAX for the 36 gate and up kernels of the
    270M model in int8, per decode step: 2.5 ms this way, 32 ms as an einsum,
    8.2 ms in float32. So up to `_MAX_ROWS_ONE_AT_A_TIME` rows are
    multiplied one at a time, in a loop that compiles once (JAX, 4 rows: 6
    ms against 43 ms at once; TensorFlow in a compiled function likewise).
    On JAX, from `_MIN_ROWS_SUMMED_TOGETHER` rows, they are multiplied
    instead as one elementwise product with the converted weight, summed
    over the contracted axes and ordered `(outputs, rows)`: XLA hands it to
    YNNPACK as one fused reduction that reads each int8 weight once for all
    the rows, converting it as it reads it. Measured on the 270M model in
    bfloat16+int8, in one process alternating the two forms: decode at
    batch 3 73 -> 79 tok/s, batch 4 73 -> 101, batch 16 77 -> 153; a
    16-token prompt's prefill 240 -> 378 tok/s. Two rows are faster one at
    a time (70 against 54 tok/s), and on TensorFlow this form was much
    slower (batch 4: 84 against 11 tok/s).

    PyTorch has no such fusion. With 16-bit float rows on CPU, its int8
    weight-only kernel (`torch._weight_int8pack_mm`, the one torchao uses)
    reads the int8 weight directly, on all cores (one row times a 2,048 x
    640 kernel in bfloat16: 0.065 ms, 20 GB/s). Otherwise it writes the
    converted weight, in chunks of `_TORCH_CONVERSION_CHUNK` elements that
    stay in cache (the 270M model's output projection: 26 ms against 280 ms
    at once); that kernel is no faster for float32 rows (2 GB/s). A weight
    of a vocabulary's size (`_MIN_INTEGER_PRODUCT_OUTPUTS` outputs) goes,
    for rows of any float dtype on x86, through fbgemm's integer product
    instead (`integer_product`: the 270M model's table 15 -> 9.5 ms in
    bfloat16, 26 -> 10 ms in float32), unless a gradient is needed. On XLA
    for CPUs with byte dot-product instructions (VNNI), such a weight times
    up to `_MAX_ROWS_ONE_AT_A_TIME` rows goes through XLA's integer product
    (`integer_product.xla_rows_times_transpose`) instead of converting
    each weight.

    With several contracted axes, XLA on CPU reads a single row flattened
    from them one element at a time inside the product's loop (no vector
    loads: each element's index is split into the axes). There one row is
    multiplied per index of the first contracted axis, each product reading
    a contiguous slice of the row, and the products are summed. Measured on
    JAX for the 270M model's attention output projections in int8 (4 heads
    of 256), per layer and decode step: 115 us as one product, 4 x 13.5 us
    this way.

    Example:

    >>> import numpy as np
    >>> rows, weight = np.ones((1, 2, 3), "float32"), np.ones((4, 2, 3), "int8")
    >>> product = rows_times_converted_transpose(rows, weight, "float32")
    >>> keras.ops.convert_to_numpy(product).tolist()
    [[6.0, 6.0, 6.0, 6.0]]
    """

    def product(rows, weight):
        converted, rows = converted_where_used(weight, rows, dtype)
        return keras.ops.matmul(
            _flat_rows(rows), keras.ops.transpose(_flat_rows(converted))
        )

    backend = keras.backend.backend()
    if len(weight.shape) > 2 and not is_xla_on_cpu():
        return rows_times_converted_transpose(
            _flat_rows(rows), _flat_rows(weight), dtype, divisor
        )
    if divisor is not None:
        if (
            backend == "torch"
            and _torch_int8_kernel_applies(rows, weight, dtype)
            and not _torch_integer_product_applies(rows, weight, dtype)
        ):
            return _torch_int8_rows_product(rows, weight, dtype, divisor)
        outputs = rows_times_converted_transpose(rows, weight, dtype)
        return keras.ops.divide(outputs, keras.ops.cast(divisor, outputs.dtype))
    if backend == "torch" and _torch_integer_product_applies(rows, weight, dtype):
        from keras_gemma.layers import integer_product

        product = integer_product.rows_times_transpose(
            rows, weight, integer_product.part_count(dtype)
        )
        return keras.ops.cast(product, dtype)
    if backend == "torch" and _torch_int8_kernel_applies(rows, weight, dtype):
        return _torch_int8_rows_product(rows, weight, dtype, divisor=None)
    if _xla_integer_product_applies(rows, weight):
        from keras_gemma.layers import integer_product

        product = integer_product.xla_rows_times_transpose(
            rows, weight, integer_product.part_count(dtype)
        )
        return keras.ops.cast(product, dtype)
    if is_half_precision(dtype) and is_xla_on_cpu():
        # XLA on CPU converts and multiplies 16-bit floats one element at a
        # time: the 270M model in bfloat16 with int8 weights decoded at 4.3
        # tok/s on JAX, against 60 in float32.
        product = rows_times_converted_transpose(
            keras.ops.cast(rows, "float32"), weight, "float32"
        )
        return keras.ops.cast(product, dtype)
    count = rows.shape[0]
    if len(weight.shape) > 2 and count == 1:
        return _row_times_converted_transpose_by_parts(rows, weight, dtype)
    if isinstance(count, int) and 1 < count <= _MAX_ROWS_ONE_AT_A_TIME:
        if backend == "jax" and count >= _MIN_ROWS_SUMMED_TOGETHER:
            return _rows_times_converted_transpose_summed(rows, weight, dtype)
        if backend == "jax":
            import jax

            def one_row(row):
                return rows_times_converted_transpose(row, weight, dtype)

            return jax.lax.map(one_row, rows[:, None])[:, 0]
        if backend == "tensorflow" and not _tensorflow_executing_eagerly():
            import tensorflow as tf

            return tf.map_fn(
                lambda row: rows_times_converted_transpose(row[None], weight, dtype)[0],
                rows,
                fn_output_signature=rows.dtype,
            )
    if backend == "torch" and _torch_converts_in_place(rows, weight):
        return _torch_rows_times_converted_chunks(rows, weight, dtype)
    chunk = _torch_chunk_rows(weight)
    if backend == "torch" and weight.shape[0] > chunk:
        return keras.ops.concatenate(
            [
                product(rows, weight[start : start + chunk])
                for start in range(0, weight.shape[0], chunk)
            ],
            axis=-1,
        )
    return product(rows, weight)


def _rows_times_converted_transpose_summed(rows, weight, dtype):
    """A few `rows` times the converted `weight`, transposed, as an
    elementwise product summed over the contracted axes, ordered
    `(outputs, rows)`, which XLA on CPU fuses into one reduction reading
    each weight once for all the rows (see `rows_times_converted_transpose`)."""
    weight, rows = _flat_rows(weight), _flat_rows(rows)
    converted, rows = converted_where_used(weight, rows, dtype)
    products = keras.ops.sum(converted[:, None, :] * rows[None, :, :], axis=-1)
    return keras.ops.transpose(products)


def _row_times_converted_transpose_by_parts(row, weight, dtype):
    """One row `(1, parts, k)` times `weight` `(m, parts, k)`, as the sum of
    one product per part, in a loop that compiles once (see
    `rows_times_converted_transpose`)."""
    outputs, parts = weight.shape[:2]
    size = math.prod(weight.shape[2:])
    row = keras.ops.reshape(row, (1, parts, size))
    weight = keras.ops.reshape(weight, (outputs, parts, size))

    def part(index):
        row_part = keras.ops.reshape(
            keras.ops.slice(row, (0, index, 0), (1, 1, size)), (1, size)
        )
        # Converted inside the loop, per part (see `converted_where_used`).
        converted, row_part = converted_where_used(weight, row_part, dtype)
        weight_part = keras.ops.slice(converted, (0, index, 0), (outputs, 1, size))
        weight_part = keras.ops.reshape(weight_part, (outputs, size))
        return keras.ops.matmul(row_part, keras.ops.transpose(weight_part))[0]

    backend = keras.backend.backend()
    indices = keras.ops.arange(parts)
    if backend == "jax":
        import jax

        products = jax.lax.map(part, indices)
    elif backend == "tensorflow" and not _tensorflow_executing_eagerly():
        import tensorflow as tf

        products = tf.map_fn(part, indices, fn_output_signature=row.dtype)
    else:
        products = keras.ops.stack([part(index) for index in range(parts)])
    return keras.ops.sum(products, axis=0, keepdims=True)


def _tensorflow_executing_eagerly():
    import tensorflow as tf

    return tf.executing_eagerly()


def _flat_rows(tensor):
    """`tensor` `(n, *axes)` as a matrix `(n, prod(axes))`."""
    return keras.ops.reshape(tensor, (-1, math.prod(tensor.shape[1:])))


def multiplies_half_precision_slowly(tensor):
    """Whether products of 16-bit floats like `tensor` run much slower than
    in float32 where it lives: on CPUs, where XLA converts them one element
    at a time and PyTorch, without bfloat16 instructions (AVX2), runs a
    generic loop. Measured on the 2-core machines, PyTorch, 4 query heads
    times 2,048 cached keys: bfloat16 7.1 ms, float32 with the conversion
    0.27 ms.

    Example:

    >>> import numpy as np
    >>> multiplies_half_precision_slowly(np.ones(2, "float16"))
    True
    """
    if keras.backend.backend() == "torch":
        return keras.ops.convert_to_tensor(tensor).device.type == "cpu"
    return is_xla_on_cpu()


def cpu_flags(path="/proc/cpuinfo"):
    """The instruction set extensions this CPU lists, as a set of names
    (`avx2`, `avx512_vnni`...), read from Linux's /proc/cpuinfo; empty
    elsewhere."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_xla_on_cpu():
    """Whether this backend compiles with XLA for a CPU (JAX, TensorFlow)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


def _torch_int8_kernel_applies(rows, weight, dtype):
    import torch

    return (
        is_half_precision(dtype)
        and weight.dtype == torch.int8
        and rows.device.type == "cpu"
        and hasattr(torch, "_weight_int8pack_mm")
    )


# From this many outputs (a vocabulary), PyTorch multiplies by an int8 weight
# through fbgemm's integer product (`integer_product`): for the 270M model's
# table, 15 -> 9.5 ms per decode step with the split of the rows (fbgemm
# alone: 7.4-8 ms). For the layers' kernels fbgemm's fixed
# cost per call makes it no faster. JAX and TensorFlow likewise through XLA's
# integer product, on CPUs with byte dot products (the 270M model in
# bfloat16+int8 on a 2-core Xeon: JAX 29.6 -> 35.6 tok/s, TensorFlow 31.7 ->
# 35.2; with the layers' gate, up and down kernels too, no faster).
_MIN_INTEGER_PRODUCT_OUTPUTS = 65536


def _torch_integer_product_applies(rows, weight, dtype):
    import torch

    from keras_gemma.layers import integer_product

    return (
        weight.dtype == torch.int8
        and len(weight.shape) == 2
        and weight.shape[0] >= _MIN_INTEGER_PRODUCT_OUTPUTS
        and rows.device.type == "cpu"
        and not (torch.is_grad_enabled() and rows.requires_grad)
        and integer_product.applies(dtype)
    )


def _xla_integer_product_applies(rows, weight):
    from keras_gemma.layers import integer_product

    count = rows.shape[0]
    return (
        is_xla_on_cpu()
        and len(weight.shape) == 2
        and weight.shape[0] >= _MIN_INTEGER_PRODUCT_OUTPUTS
        and keras.backend.standardize_dtype(weight.dtype) == "int8"
        and isinstance(count, int)
        and 1 <= count <= _MAX_ROWS_ONE_AT_A_TIME
        and not (
            keras.backend.backend() == "tensorflow" and _tensorflow_executing_eagerly()
        )
        and integer_product.cpu_multiplies_bytes()
    )


def _torch_chunk_rows(weight):
    """How many rows of `weight` PyTorch converts at a time."""
    return max(1, _TORCH_CONVERSION_CHUNK // weight.shape[1])


def _torch_converts_in_place(rows, weight):
    import torch

    return (
        not torch.is_grad_enabled()  # a gradient would need each chunk kept
        and isinstance(weight, torch.Tensor)
        and not weight.is_floating_point()
    )


_torch_scratch = threading.local()


def torch_write_count(tensor):
    """How many times the PyTorch `tensor` was written in place: `None` for
    an inference tensor, which keeps no count, or anything not a tensor.

    Example:

    >>> if keras.backend.backend() == "torch":
    ...     import torch
    ...     tensor = torch.zeros(2)
    ...     before = torch_write_count(tensor)
    ...     _ = tensor.add_(1.0)
    ...     assert torch_write_count(tensor) == before + 1
    ...     assert torch_write_count(3) is None
    """
    try:
        return tensor._version
    except (RuntimeError, AttributeError):
        return None


def _torch_scratch_buffer(size, dtype, device):
    """A buffer of at least `size` elements, kept per thread, dtype and
    device, that the converted chunks of int8 weights are written into.

    A new multi-megabyte tensor per chunk may come from memory the C
    allocator just returned to the system, and then costs a page fault per
    4 KB: measured, the 270M model in float32 with int8 weights decoded at
    2.8 tok/s instead of 19.6 in some processes (depending on what they
    allocated before), its prefill at 30 instead of 79.
    """
    import torch

    buffers = _torch_scratch.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buffer


def _torch_rows_times_converted_chunks(rows, weight, dtype):
    """`rows @ transpose(cast(weight, dtype))` without a gradient, each
    chunk of `weight` converted into the same scratch buffer."""
    import torch

    rows = keras.ops.cast(rows, dtype)
    chunk = _torch_chunk_rows(weight)
    size = min(chunk, weight.shape[0]) * weight.shape[1]
    buffer = _torch_scratch_buffer(size, rows.dtype, rows.device)
    outputs = []
    for start in range(0, weight.shape[0], chunk):
        part = weight[start : start + chunk]
        converted = buffer[: part.numel()].view(part.shape)
        converted.copy_(part)
        outputs.append(rows_times_matrix(rows, converted.T))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _torch_int8_rows_product(rows, weight, dtype, divisor):
    """`rows @ transpose(weight)` in `dtype` by PyTorch's int8 kernel, which
    multiplies each output by a scale: the reciprocal of `divisor`'s, or 1.

    Multiplying by the reciprocal inside the kernel, rather than dividing
    after it, is one operation fewer per product (126 per decode step of
    the 270M model), and rounds to `dtype` twice instead of three times."""
    import torch

    rows = keras.ops.cast(rows, dtype).contiguous()
    if divisor is None:
        scales = torch.ones(weight.shape[0], dtype=rows.dtype, device=rows.device)
    else:
        reciprocal = 1.0 / keras.ops.cast(divisor, "float32")
        scales = keras.ops.cast(reciprocal, rows.dtype)
    return torch._weight_int8pack_mm(rows, weight.contiguous(), scales)
