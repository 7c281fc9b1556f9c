"""Weights stored in the memory layout fast for decoding on PyTorch, with
the same values and products on every backend."""

import re

import keras
import numpy as np
import pytest

from keras_gemma.checkpoints.variables import numpy_dtype
from keras_gemma.layers.projection import Projection
from keras_gemma.layers.storage_layout import (
    contracted_axes_innermost,
    initializer_with_memory_order,
    rows_times_converted_transpose,
    rows_times_matrix,
    rows_times_transpose,
)
from keras_gemma.layers.token_embedding import TiedTokenEmbedding
from tests.tiny_configs import tiny_causal_lm


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _memory_order(variable):
    """The axes of a PyTorch variable from outermost to innermost in memory."""
    strides = variable.value.stride()
    return tuple(sorted(range(len(strides)), key=lambda axis: -strides[axis]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "equation, output_shape, input_shape",
    [
        ("btd,df->btf", (None, 12), (1, 1, 8)),
        ("btd,ndh->btnh", (None, 3, 4), (1, 1, 8)),
        ("btnh,nhd->btd", (None, 8), (1, 2, 3, 4)),
    ],
)
def test_projection_kernel_layout_and_product(
    equation, output_shape, input_shape, dtype
):
    layer = Projection(equation, output_shape=output_shape, dtype=dtype)
    layer.build(input_shape)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=layer.kernel.shape).astype("float32")
    layer.kernel.assign(kernel)  # as loading a checkpoint does
    x = rng.normal(size=input_shape).astype("float32")
    # Round the inputs and kernel as a 16-bit layer does before multiplying.
    rounded = [_numpy(keras.ops.cast(v, layer.compute_dtype)) for v in (x, kernel)]
    expected = np.einsum(equation, *rounded)
    np.testing.assert_allclose(_numpy(layer(x)), expected, rtol=2e-2, atol=2e-2)
    if keras.backend.backend() == "torch":
        assert _memory_order(layer._kernel) == contracted_axes_innermost(equation)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_embedding_table_layout_and_logits(dtype):
    layer = TiedTokenEmbedding(input_dim=11, output_dim=4, dtype=dtype)
    layer.build((None, None))
    rng = np.random.default_rng(1)
    table = rng.normal(size=(11, 4)).astype("float32")
    layer.embeddings.assign(table)
    hidden = rng.normal(size=(1, 2, 4)).astype("float32")
    rounded = [_numpy(keras.ops.cast(v, dtype)) for v in (hidden, table)]
    logits = _numpy(layer(hidden, reverse=True))
    np.testing.assert_allclose(logits, rounded[0] @ rounded[1].T, rtol=2e-2, atol=2e-2)
    if keras.backend.backend() == "torch":
        # Column-major in float32 (MKL's fast product), row-major in 16 bits.
        expected = (1, 0) if dtype == "float32" else (0, 1)
        assert _memory_order(layer._embeddings) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_preset_keeps_the_layout_and_the_values(dtype, tmp_path):
    """Loading replaces each variable's initializer with the checkpoint's
    value: the layout must survive that, and the values be the float32
    preset's (rounded to the dtype)."""
    from keras_gemma import GemmaCausalLM

    tiny_causal_lm().save_to_preset(tmp_path / "tiny")
    reference = GemmaCausalLM.from_preset(tmp_path / "tiny").backbone
    loaded = GemmaCausalLM.from_preset(tmp_path / "tiny", dtype=dtype).backbone
    query = loaded.transformer_layers[0].attention.query
    expected = reference.transformer_layers[0].attention.query.kernel
    np.testing.assert_array_equal(
        _numpy(query.kernel), _numpy(keras.ops.cast(expected, dtype))
    )
    np.testing.assert_array_equal(
        _numpy(loaded.token_embedding.embeddings),
        _numpy(keras.ops.cast(reference.token_embedding.embeddings, dtype)),
    )
    if keras.backend.backend() == "torch":
        assert _memory_order(query._kernel) == (0, 2, 1)
        table_order = (0, 1) if dtype != "float32" else (1, 0)
        assert _memory_order(loaded.token_embedding._embeddings) == table_order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source", ["c_order", "transposed_view", "read_only"])
def test_memory_order_initializer_copies_a_numpy_value_once(dtype, source):
    """A loaded value (numpy) becomes a tensor of its own, in the order
    asked for, with the same values; wide enough to be copied in blocks."""
    import warnings

    values = np.arange(600 * 5, dtype="float32").reshape(600, 5) / 7
    if source == "transposed_view":
        values = np.ascontiguousarray(values.T).T
    value = values.astype(numpy_dtype(dtype))
    if source == "read_only":
        value.flags.writeable = False
    initializer = initializer_with_memory_order(lambda shape, dtype=None: value, (1, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = initializer((600, 5), dtype=dtype)
    expected = _numpy(keras.ops.convert_to_tensor(value.copy()))
    np.testing.assert_array_equal(_numpy(tensor), expected)
    if keras.backend.backend() == "torch":
        assert str(tensor.dtype) == f"torch.{dtype}"
        strides = tensor.stride()
        assert sorted(range(2), key=lambda axis: -strides[axis]) == [1, 0]
        if value.flags.writeable:
            value[...] = 0  # the tensor does not share the loader's memory
            np.testing.assert_array_equal(_numpy(tensor), expected)


def _compiled_while_loop_text(function, *args):
    """The optimized XLA program of `function`, as text (JAX, TensorFlow)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(function).lower(*args).compile().as_text()
    import tensorflow as tf

    compiled = tf.function(function, jit_compile=True)
    return compiled.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="XLA programs: JAX and TensorFlow"
)
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_weights_are_converted_inside_a_loop_not_before_it(rows):
    """XLA hoists a loop-invariant conversion out of a loop, which would
    keep a float32 copy of every int8 weight alive and read it at every
    step: the loop must carry the weight in int8 only."""
    weight = np.random.default_rng(0).integers(-127, 127, (64, 32)).astype("int8")
    start = np.ones((rows, 32), "float32")

    def loop(weight, start):
        def body(step, rows_value):
            products = rows_times_converted_transpose(rows_value, weight, "float32")
            return products[:, :32] * 1e-3

        return keras.ops.fori_loop(0, 3, body, start)

    text = _compiled_while_loop_text(loop, weight, start)
    loops = [line for line in text.splitlines() if " while(" in line]
    assert loops, "no while loop in the compiled program"
    assert all("f32[64,32]" not in line for line in loops)
    assert any("s8[64,32]" in line for line in loops)
    # Kept there by a barrier, not by arithmetic on every int8 weight read.
    assert not re.search(r"= s8\[64,32\]\S* add\(", text)
    expected = start
    for _ in range(3):
        expected = (expected @ weight.T.astype("float32"))[:, :32] * 1e-3
    np.testing.assert_allclose(
        _numpy(loop(weight, start)), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="XLA programs: JAX and TensorFlow"
)
def test_int8_products_of_a_bfloat16_model_run_in_float32_on_xla_cpu():
    """XLA on CPU converts each int8 weight to bfloat16 and then to float32
    for its product, the first one element at a time (4 tok/s against 60
    for the 270M model): the weight must go to float32 directly."""
    weight = np.random.default_rng(0).integers(-127, 127, (64, 32)).astype("int8")
    rows = keras.ops.cast(np.ones((1, 32), "float32"), "bfloat16")

    def product(weight, rows):
        return rows_times_converted_transpose(rows, weight, "bfloat16")

    text = _compiled_while_loop_text(product, weight, rows)
    assert "f32[64,32]" in text and "bf16[64,32]" not in text
    assert "bf16[1,64]" in text  # the result is still bfloat16


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="XLA programs: JAX and TensorFlow"
)
def test_bfloat16_output_projection_runs_in_float32_on_xla_cpu():
    """The same for a bfloat16 vocabulary table: multiplied in bfloat16,
    XLA on CPU made the 270M model decode at half the speed."""
    layer = TiedTokenEmbedding(input_dim=64, output_dim=32, dtype="bfloat16")
    layer.build((None, None))
    hidden = keras.ops.cast(np.ones((1, 1, 32), "float32"), "bfloat16")
    text = _compiled_while_loop_text(lambda x: layer(x, reverse=True), hidden)
    # The table converted to float32 and no bfloat16 product.
    assert "f32[64,32]" in text
    assert "bf16[1,64]" not in text and "bf16[64]" not in text
    table = _numpy(layer.embeddings)
    np.testing.assert_allclose(
        _numpy(layer(hidden, reverse=True))[0, 0], table.sum(axis=1), rtol=1e-5
    )


@pytest.mark.parametrize("gradient", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_rows_times_converted_transpose_in_chunks_matches_numpy(
    rows, gradient, monkeypatch
):
    """One row, a few (one at a time on JAX), many; PyTorch converting the
    weight in chunks of 5 rows, the last one shorter: new tensors when a
    gradient may be needed, else one scratch buffer rewritten per chunk."""
    import contextlib

    from keras_gemma.layers import storage_layout

    monkeypatch.setattr(storage_layout, "_TORCH_CONVERSION_CHUNK", 5 * 16)
    rng = np.random.default_rng(rows)
    weight = rng.integers(-127, 127, (23, 16)).astype("int8")
    inputs = rng.normal(size=(rows, 16)).astype("float32")
    context = contextlib.nullcontext()
    if keras.backend.backend() == "torch":
        import torch

        weight = torch.from_numpy(weight)
        context = torch.enable_grad() if gradient else torch.inference_mode()
    with context:
        outputs = rows_times_converted_transpose(inputs, weight, "float32")
    np.testing.assert_allclose(
        _numpy(outputs),
        inputs @ np.asarray(weight).T.astype("float32"),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_half_precision_rows_times_int8_weight_matches_numpy(dtype, rows, monkeypatch):
    """16-bit rows times an int8 weight; on PyTorch through its int8 kernel,
    which must be the one used (a conversion of the weight is 4x slower)."""
    calls = []
    if keras.backend.backend() == "torch":
        import torch

        kernel = torch._weight_int8pack_mm
        monkeypatch.setattr(
            torch,
            "_weight_int8pack_mm",
            lambda *args: calls.append(args[1].shape) or kernel(*args),
        )
    rng = np.random.default_rng(rows)
    weight = rng.integers(-127, 127, (40, 64)).astype("int8")
    inputs = rng.normal(size=(rows, 64)).astype("float32")
    outputs = rows_times_converted_transpose(
        keras.ops.cast(inputs, dtype), keras.ops.convert_to_tensor(weight), dtype
    )
    assert keras.backend.standardize_dtype(outputs.dtype) == dtype
    rounded = _numpy(keras.ops.cast(inputs, dtype))
    np.testing.assert_allclose(
        _numpy(outputs), rounded @ weight.T.astype("float32"), rtol=2e-2, atol=0.5
    )
    if keras.backend.backend() == "torch":
        assert calls == [(40, 64)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_weight_with_several_contracted_axes_matches_numpy(rows, dtype):
    """Rows `(n, heads, size)` times a weight `(m, heads, size)`, summed over
    both axes, as an attention output projection; compiled too on XLA."""
    rng = np.random.default_rng(rows)
    weight = rng.integers(-127, 127, (23, 4, 16)).astype("int8")
    inputs = rng.normal(size=(rows, 4, 16)).astype("float32")
    rounded = _numpy(keras.ops.cast(inputs, dtype))
    expected = rounded.reshape(rows, -1) @ weight.reshape(23, -1).T.astype("float32")

    def product(inputs, weight):
        return rows_times_converted_transpose(
            keras.ops.cast(inputs, dtype), weight, dtype
        )

    results = [product(inputs, keras.ops.convert_to_tensor(weight))]
    if keras.backend.backend() == "jax":
        import jax

        results.append(jax.jit(product)(inputs, weight))
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        results.append(tf.function(product, jit_compile=True)(inputs, weight))
    for outputs in results:
        assert tuple(outputs.shape) == (rows, 23)
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(
            _numpy(outputs), expected, rtol=tolerance, atol=tolerance * 30
        )


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="XLA programs: JAX and TensorFlow"
)
def test_one_row_times_several_contracted_axes_is_multiplied_per_part():
    """XLA on CPU reads a row flattened from several axes one element at a
    time (4x slower for the 270M model's attention output projections): one
    row is multiplied per index of the first contracted axis, in a loop that
    carries the weight in int8 and collects the 4 partial products."""
    weight = np.random.default_rng(0).integers(-127, 127, (64, 4, 32)).astype("int8")
    row = np.ones((1, 4, 32), "float32")

    def product(weight, row):
        return rows_times_converted_transpose(row, weight, "float32")

    text = _compiled_while_loop_text(product, weight, row)
    loops = [line for line in text.splitlines() if " while(" in line]
    assert len(loops) == 1, "no while loop in the compiled program"
    assert "s8[64,4,32]" in loops[0] and "f32[4,64]" in loops[0]
    assert "f32[64,4,32]" not in loops[0]
    np.testing.assert_allclose(
        _numpy(product(weight, row))[0], weight.reshape(64, -1).sum(axis=1)
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's XLA programs")
@pytest.mark.parametrize("rows, summed", [(2, False), (4, True), (16, True)])
def test_a_few_rows_times_int8_weight_read_once_on_jax(rows, summed):
    """From 3 rows, one product summed over the contracted axes, which XLA
    hands to YNNPACK as one fused reduction reading each int8 weight once
    for all the rows: no loop over them, no converted weight written. 2
    rows go one at a time (a loop)."""
    import jax

    weight = np.random.default_rng(0).integers(-127, 127, (128, 4, 16)).astype("int8")
    inputs = np.random.default_rng(1).normal(size=(rows, 4, 16)).astype("float32")

    def product(weight, inputs):
        return rows_times_converted_transpose(inputs, weight, "float32")

    text = jax.jit(product).lower(weight, inputs).compile().as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    assert (" while(" in entry) == (not summed)
    if summed:
        assert not re.search(r"= f32\[128,(4,16|64)\]", entry)
        assert not re.search(rf"= f32\[128,{rows},(4,16|64)\]", entry)
        assert re.search(rf"= f32\[128,{rows}\]\S* fusion\(", entry)
    expected = inputs.reshape(rows, -1) @ weight.reshape(128, -1).T.astype("float32")
    np.testing.assert_allclose(
        _numpy(product(weight, inputs)),
        expected,
        atol=1e-6 * np.abs(expected).max(),
    )


@pytest.fixture
def two_torch_threads():
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _torch_products(rows, matrix):
    """The shapes of the matrix products `rows_times_matrix` runs."""
    import torch

    with torch.profiler.profile(record_shapes=True) as profile:
        rows_times_matrix(rows, matrix)
    return [
        (event.name, [tuple(shape) for shape in event.input_shapes[:2]])
        for event in profile.events()
        if event.name in ("aten::mm", "aten::bmm")
    ]


@pytest.mark.parametrize("count", [1, 5, 17])
@pytest.mark.parametrize("column_major", [False, True])
def test_rows_times_matrix_matches_numpy(count, column_major, two_torch_threads):
    rng = np.random.default_rng(count)
    rows = rng.normal(size=(count, 6)).astype("float32")
    matrix = rng.normal(size=(6, 10)).astype("float32")
    stored = keras.ops.convert_to_tensor(matrix.T if column_major else matrix)
    stored = keras.ops.transpose(stored) if column_major else stored
    outputs = rows_times_matrix(keras.ops.convert_to_tensor(rows), stored)
    np.testing.assert_allclose(_numpy(outputs), rows @ matrix, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TensorFlow's gradient of its transposed form of the product",
)
def test_rows_times_transpose_gradients_read_the_matrix_as_stored():
    """TensorFlow multiplies `matrix @ transpose(rows)` (fast for a few
    rows); both gradients are products that do not transpose `matrix`
    (TensorFlow's own made `transpose(matrix) @ ...`: the vocabulary table
    of a LoRA step, 291 against 158 ms)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    rows = tf.constant(rng.normal(size=(5, 3)).astype("float32"))
    matrix = tf.constant(rng.normal(size=(7, 3)).astype("float32"))
    upstream = rng.normal(size=(5, 7)).astype("float32")

    @tf.function
    def gradients(rows, matrix):
        with tf.GradientTape() as tape:
            tape.watch([rows, matrix])
            loss = tf.reduce_sum(rows_times_transpose(rows, matrix) * upstream)
        return tape.gradient(loss, [rows, matrix])

    for_rows, for_matrix = gradients(rows, matrix)
    np.testing.assert_allclose(for_rows, upstream @ matrix.numpy(), rtol=1e-5)
    np.testing.assert_allclose(for_matrix, upstream.T @ rows.numpy(), rtol=1e-5)
    graph = gradients.get_concrete_function(rows, matrix).graph
    reads = [
        op.get_attr("transpose_a" if position == 0 else "transpose_b")
        for op in graph.get_operations()
        if op.type == "MatMul"
        for position, tensor in enumerate(op.inputs)
        if tensor.op.name == "matrix"
    ]
    assert reads == [False, False]  # the product itself and the rows' gradient


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's threads")
def test_few_float32_rows_are_split_over_torch_threads(two_torch_threads):
    """MKL multiplies a few float32 rows on one thread: the columns are
    split in one block per thread, multiplied as one batched product."""
    import torch

    matrix = torch.randn(6, 10)
    assert _torch_products(torch.randn(3, 6), matrix) == [
        ("aten::bmm", [(2, 3, 6), (2, 6, 5)])
    ]
    # many rows (a prompt), 16-bit rows, an odd number of columns: as is
    for rows, matrix in [
        (torch.randn(17, 6), torch.randn(6, 10)),
        (torch.randn(3, 6, dtype=torch.bfloat16), torch.randn(6, 10).bfloat16()),
        (torch.randn(3, 6), torch.randn(6, 9)),
    ]:
        products = _torch_products(rows, matrix)
        assert products == [("aten::mm", [tuple(rows.shape), tuple(matrix.shape)])]
