"""Float rows times an int8 weight, exactly, by 8-bit integer matrix
products: fbgemm's on PyTorch (x86 CPUs), XLA's on JAX and TensorFlow
(CPUs with byte dot-product instructions).

PyTorch's int8 weight-only kernel (`torch._weight_int8pack_mm`) converts
every weight to float before multiplying. On AVX2 machines that is
compute-bound at about 5.5 GB/s per core: the 270M model's output projection
over its vocabulary (168 MB in int8) took 15 ms per decode step on the
2-core machines, 30 ms on one thread. fbgemm, the library under PyTorch's
quantized linear layers, multiplies bytes by bytes with AVX2's 8-bit
multiply-adds: the same product in 7.4 to 8 ms. XLA on CPU, converting each
weight as it reads it, took 19 ms of each 31 ms decode step of the 270M
model in bfloat16+int8 on a 2-core Xeon with AVX-512 (JAX; 7 ms on the AMD
EPYC machines); its int8 dot, which XLA hands to YNNPACK, 10 ms.

Its rows must be bytes too. Each float row `x` is split into integer parts,
`x = s1 * a1 + s2 * a2 + ...`: `a1` is `x / s1` rounded with `s1 = max|x| /
63`, each next part the rounded remainder at a scale 126 times finer. Parts
stay within [-63, 63], seven bits, because AVX2's multiply-add of unsigned
by signed bytes saturates the 16-bit sum of two products with eight. The
parts are rows of a single product (the weight is read once), computed in
integers, exact, and summed with their scales. Two parts leave each input
off by at most `max|x| / 15,876`, under bfloat16's own rounding; three,
`max|x| / 2,000,376`, for float32 rows.

fbgemm multiplies a weight it has packed into its own layout: a packed copy
is made on the first product with a weight (2 s and 168 MB for the 270M
model's table) and kept until that weight is freed or written. XLA reads the
weight as stored.

Example:

>>> import numpy as np
>>> if keras.backend.backend() == "torch" and applies("float32"):
...     import torch
...     rows = torch.tensor([[0.5, -1.25, 3.0]])
...     weight = torch.tensor([[1, 2, 3], [-4, 5, 127]], dtype=torch.int8)
...     product = rows_times_transpose(rows, weight)
...     assert torch.allclose(product, rows @ weight.float().T)
"""

import functools
import threading
import warnings
import weakref

import keras
from keras import ops

from keras_gemma.layers import storage_layout

# Integer parts are in [-_PART_LIMIT, _PART_LIMIT], stored as bytes offset
# by _ZERO_POINT (1 to 127: seven bits, see the module's docstring).
_PART_LIMIT = 63
_ZERO_POINT = 64


def applies(dtype):
    """Whether this PyTorch build can multiply `dtype` rows this way: fbgemm
    is one of its quantized engines (x86 builds), and quantized tensors,
    which PyTorch deprecates but fbgemm's packing takes, still exist."""
    import torch

    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch, "_make_per_tensor_quantized_tensor")
        and keras.backend.standardize_dtype(dtype) in ("float32", "bfloat16", "float16")
    )


def part_count(dtype):
    """How many integer parts a row of `dtype` is split into: two for 16-bit
    floats, three for float32 (see the module's docstring)."""
    return 3 if keras.backend.standardize_dtype(dtype) == "float32" else 2


def rows_times_transpose(rows, weight, parts=None):
    """`rows @ transpose(weight)` in float32 for float `rows` `(n, k)` and an
    int8 `weight` `(m, k)` on the CPU, by fbgemm, splitting each row into
    `parts` integer parts (by default `part_count(rows.dtype)`)."""
    import torch

    _register_operation()
    if parts is None:
        parts = part_count(rows.dtype)
    # Split by Keras operations outside the registered one: a recorded
    # decode step replays them as its other operations (0.03 ms), where
    # inside it they ran in Python (0.5 ms).
    integers, scales = split_into_parts(rows, parts)
    return torch.ops.keras_gemma.int8_parts_times_transpose(integers, scales, weight)


# XLA's int8 product (YNNPACK's kernels) of one or two rows took 12-80 ms for
# the 270M model's table, of four or more 10 ms: fewer are padded with zeros.
_XLA_MIN_PRODUCT_ROWS = 4


def xla_rows_times_transpose(rows, weight, parts=None):
    """`rows @ transpose(weight)` in float32 for float `rows` `(n, k)` and an
    int8 `weight` `(m, k)`, by XLA's 8-bit integer product (JAX, or
    TensorFlow inside a compiled function), splitting each row into `parts`
    integer parts (by default `part_count(rows.dtype)`). The gradient for
    `rows` is `upstream @ weight`, in float32.

    Example:

    >>> import numpy as np
    >>> rows = np.array([[0.5, -1.25, 3.0]], "float32")
    >>> weight = np.array([[1, 2, 3], [-4, 5, 127]], "int8")
    >>> if keras.backend.backend() in ("jax", "tensorflow"):
    ...     product = xla_rows_times_transpose(rows, weight)
    ...     np.testing.assert_allclose(
    ...         ops.convert_to_numpy(product), rows @ weight.T, rtol=1e-6
    ...     )
    """
    if parts is None:
        parts = part_count(rows.dtype)

    @ops.custom_gradient
    def product(rows, weight):
        def gradient(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            converted = ops.cast(weight, "float32")
            return ops.cast(ops.matmul(upstream, converted), rows.dtype), None

        return _xla_product(rows, weight, parts), gradient

    return product(rows, weight)


def _xla_product(rows, weight, parts):
    count = rows.shape[0]
    integers, scales = split_into_parts(rows, parts)
    flat = ops.cast(ops.reshape(integers, (parts * count, -1)), "int8")
    padding = _XLA_MIN_PRODUCT_ROWS - parts * count
    if padding > 0:
        flat = ops.pad(flat, ((0, padding), (0, 0)))
    weight, flat = storage_layout.optimization_barrier(weight, flat)
    if keras.backend.backend() == "jax":
        import jax

        products = jax.lax.dot_general(
            flat, weight, (((1,), (1,)), ((), ())), preferred_element_type="int32"
        )
    else:
        import tensorflow as tf

        products = tf.linalg.matmul(
            flat, weight, transpose_b=True, output_type=tf.int32
        )
    # Summed part by part: as one reduction over the parts, XLA handed the
    # sum to YNNPACK too, which took 3.2 ms for the table's outputs.
    products = ops.cast(products, "float32")
    total = None
    for part in range(parts):
        scaled = products[part * count : (part + 1) * count] * scales[part]
        total = scaled if total is None else total + scaled
    return total


def split_into_parts(rows, parts):
    """Splits float `rows` `(n, k)` into `(integers, scales)`: `integers`
    `(parts, n, k)` float32 holding whole numbers in [-63, 63] and `scales`
    `(parts, n, 1)`, with `rows` close to `sum(scales * integers)`."""
    remainder = ops.cast(rows, "float32")
    largest = ops.max(ops.abs(remainder), axis=-1, keepdims=True)
    scale = ops.where(largest > 0, largest, 1.0) / _PART_LIMIT
    integers, scales = [], []
    for _ in range(parts):
        part = ops.clip(ops.round(remainder / scale), -_PART_LIMIT, _PART_LIMIT)
        integers.append(part)
        scales.append(scale)
        remainder = remainder - part * scale
        scale = scale / (2 * _PART_LIMIT)
    return ops.stack(integers), ops.stack(scales)


@functools.cache
def cpu_multiplies_bytes():
    """Whether this CPU has instructions for dot products of bytes summed
    into 32 bits (AVX-512 VNNI or AVX-VNNI), where XLA's int8 product is
    faster than converting each weight: measured on a Xeon with them only
    (the AMD EPYC machines, AVX2 alone, convert at about the memory's
    speed). Read from Linux's /proc/cpuinfo; False elsewhere."""
    return bool(storage_layout.cpu_flags() & {"avx512_vnni", "avx_vnni"})


def _product(integers, scales, weight):
    """`sum(scales * integers) @ transpose(weight)` by fbgemm, for the
    `(parts, n, k)` integers and `(parts, n, 1)` scales of `split_into_parts`."""
    import torch

    parts, count, size = integers.shape
    products = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        integers.reshape(parts * count, size), 1.0, _ZERO_POINT, _packed(weight)
    )
    # Each row's parts summed with their scales as one batched product of
    # `(1, parts)` by `(parts, outputs)`: one pass over the parts' outputs
    # (the table of the 270M model: 0.05 ms, against 0.2 ms multiplied and
    # then summed).
    by_row = products.reshape(parts, count, -1).transpose(0, 1)
    return torch.bmm(scales.permute(1, 2, 0), by_row).reshape(count, -1)


def _product_shape(integers, scales, weight):
    import torch

    return integers.new_empty((integers.shape[1], weight.shape[0]), dtype=torch.float32)


_registered = threading.Lock()


def _register_operation():
    """Registers `keras_gemma::int8_parts_times_transpose` once: as one
    PyTorch operation, a recorded decode step replays it as it is (its
    packed weight cache included)."""
    import torch

    with _registered:
        if hasattr(torch.ops.keras_gemma, "int8_parts_times_transpose"):
            return

        def int8_parts_times_transpose(
            integers: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor
        ) -> torch.Tensor:
            return _product(integers, scales, weight)

        operation = torch.library.custom_op(
            "keras_gemma::int8_parts_times_transpose", mutates_args=()
        )(int8_parts_times_transpose)
        operation.register_fake(_product_shape)


class _PackedWeight:
    def __init__(self, weight, packed):
        self.weight = weakref.ref(weight)
        self.version = storage_layout.torch_write_count(weight)
        self.data_pointer = weight.data_ptr()
        self.packed = packed


# id(weight) -> _PackedWeight, dropped when the weight is freed.
_packed_weights = {}
_packing = threading.Lock()


def _packed(weight):
    """fbgemm's packed copy of the int8 `weight` `(m, k)`, made on first use
    and again whenever `weight` is written in place."""
    import torch

    key = id(weight)
    with _packing:
        entry = _packed_weights.get(key)
        if (
            entry is not None
            and entry.weight() is weight
            and entry.version == storage_layout.torch_write_count(weight)
            and entry.data_pointer == weight.data_ptr()
        ):
            return entry.packed
        with warnings.catch_warnings():
            # Quantized tensors are deprecated as a user-facing type; fbgemm's
            # packing still takes one.
            warnings.simplefilter("ignore")
            quantized = torch._make_per_tensor_quantized_tensor(
                weight.contiguous(), 1.0, 0
            )
            engine = torch.backends.quantized.engine
            try:
                torch.backends.quantized.engine = "fbgemm"
                packed = torch.ops.quantized.linear_prepack(quantized, None)
            finally:
                torch.backends.quantized.engine = engine
        if entry is None:
            weakref.finalize(weight, _packed_weights.pop, key, None)
        _packed_weights[key] = _PackedWeight(weight, packed)
        return packed
