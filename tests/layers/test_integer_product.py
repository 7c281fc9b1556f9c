"""Float rows times int8 weights by integer products: fbgemm's on PyTorch,
XLA's on JAX and TensorFlow. Exact up to the split of the rows into integer
parts, used for vocabulary sized weights, replayed inside a recorded decode
step (PyTorch) or compiled into one (XLA)."""

import keras
import numpy as np
import pytest

torch_only = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="fbgemm: PyTorch's x86 builds"
)
xla_only = pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="XLA's integer product"
)


@pytest.fixture
def integer_product():
    from keras_gemma.layers import integer_product

    if keras.backend.backend() == "torch" and not integer_product.applies("float32"):
        pytest.fail("this x86 PyTorch build should have fbgemm")
    return integer_product


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_rows_split_into_integer_parts_within_the_bound(integer_product, parts):
    rng = np.random.default_rng(parts)
    rows = rng.normal(size=(4, 100)) * np.array([[1e-3], [1.0], [50.0], [0.0]])
    integers, scales = integer_product.split_into_parts(
        keras.ops.convert_to_tensor(rows, "float32"), parts
    )
    integers = keras.ops.convert_to_numpy(integers).astype("float64")
    scales = keras.ops.convert_to_numpy(scales).astype("float64")
    assert integers.shape == (parts, 4, 100) and scales.shape == (parts, 4, 1)
    np.testing.assert_array_equal(integers, np.round(integers))
    assert np.abs(integers).max() <= 63
    rebuilt = (integers * scales).sum(axis=0)
    # Each part leaves at most half a step of the next, finer, scale.
    bound = np.abs(rows).max(axis=1, keepdims=True) / (2 * 63 * 126 ** (parts - 1))
    assert np.all(np.abs(rebuilt - rows) <= bound * 1.01 + 1e-9)
    np.testing.assert_array_equal(rebuilt[3], 0.0)


@torch_only
def test_a_weight_written_in_place_is_packed_again(integer_product):
    import torch

    weight = torch.ones((8, 4), dtype=torch.int8)
    rows = torch.ones((1, 4))
    assert integer_product.rows_times_transpose(rows, weight).tolist() == [[4.0] * 8]
    weight[3] = -2
    product = integer_product.rows_times_transpose(rows, weight)
    assert product[0, 3].item() == -8.0 and product[0, 2].item() == 4.0


def _parts_of_each_call(monkeypatch, name):
    """A list the `parts` of each call of `integer_product.<name>`
    (`(rows, weight, parts)`) is appended to."""
    from keras_gemma.layers import integer_product

    calls = []
    product = getattr(integer_product, name)
    monkeypatch.setattr(
        integer_product,
        name,
        lambda rows, weight, parts: calls.append(parts) or product(rows, weight, parts),
    )
    return calls


@torch_only
def test_vocabulary_sized_int8_weights_go_through_fbgemm(monkeypatch):
    """The int8 products of `storage_layout` use it from
    `_MIN_INTEGER_PRODUCT_OUTPUTS` outputs, for float32 and 16-bit rows, and
    not where a gradient is needed."""
    import torch

    from keras_gemma.layers import storage_layout

    calls = _parts_of_each_call(monkeypatch, "rows_times_transpose")
    monkeypatch.setattr(storage_layout, "_MIN_INTEGER_PRODUCT_OUTPUTS", 64)
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.integers(-127, 128, (64, 32)).astype("int8"))
    rows = rng.normal(size=(2, 32)).astype("float32")
    for dtype, parts, tolerance in [("float32", 3, 1e-6), ("bfloat16", 2, 1e-2)]:
        rounded = keras.ops.cast(rows, dtype)
        with torch.inference_mode():
            outputs = storage_layout.rows_times_converted_transpose(
                rounded, weight, dtype
            )
        assert calls[-1:] == [parts]
        assert keras.backend.standardize_dtype(outputs.dtype) == dtype
        expected = rounded.double().numpy() @ weight.numpy().T.astype("float64")
        np.testing.assert_allclose(
            outputs.double().numpy(),
            expected,
            atol=tolerance * np.abs(expected).max(),
        )
    calls.clear()
    trained = torch.tensor(rows, requires_grad=True)
    with torch.enable_grad():
        outputs = storage_layout.rows_times_converted_transpose(
            trained, weight, "float32"
        )
        outputs.sum().backward()
    assert calls == []
    np.testing.assert_allclose(
        trained.grad.numpy(), np.broadcast_to(weight.numpy().sum(0), (2, 32))
    )
    narrow = weight[:63]
    with torch.inference_mode():
        storage_layout.rows_times_converted_transpose(rows, narrow, "float32")
    assert calls == []


@torch_only
def test_replayed_in_a_recorded_step(integer_product):
    """Recorded by `make_fx` as one operation, which TorchScript replays."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from keras_gemma.generation.torch_graph import replay_with_torchscript

    weight = torch.from_numpy(
        np.random.default_rng(0).integers(-127, 128, (16, 8)).astype("int8")
    )

    def step(rows):
        return integer_product.rows_times_transpose(rows * 2.0, weight) + 1.0

    with torch.inference_mode():
        recorded = make_fx(step)(torch.ones((1, 8)))
        targets = {str(node.target) for node in recorded.graph.nodes}
        assert "keras_gemma.int8_parts_times_transpose.default" in targets
        replay = replay_with_torchscript(recorded, torch.ones((1, 8)))
        rows = torch.arange(8.0)[None] / 8
        np.testing.assert_allclose(
            replay(rows).numpy(),
            (rows * 2.0).numpy() @ weight.numpy().T.astype("float32") + 1.0,
            rtol=1e-5,
        )


@torch_only
def test_a_build_without_quantized_tensors_multiplies_without_fbgemm(monkeypatch):
    """PyTorch deprecates quantized tensors, which fbgemm's packing takes:
    where they are gone, vocabulary-sized products take the int8 kernel."""
    import torch

    from keras_gemma.layers import integer_product, storage_layout

    monkeypatch.delattr(torch, "_make_per_tensor_quantized_tensor")
    monkeypatch.setattr(storage_layout, "_MIN_INTEGER_PRODUCT_OUTPUTS", 64)
    assert not integer_product.applies("float32")
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.integers(-127, 128, (64, 32)).astype("int8"))
    rows = torch.from_numpy(rng.normal(size=(2, 32)).astype("float32"))
    with torch.inference_mode():
        outputs = storage_layout.rows_times_converted_transpose(rows, weight, "float32")
    np.testing.assert_allclose(
        outputs.numpy(), rows.numpy() @ weight.numpy().T.astype("float32"), rtol=1e-5
    )


def _compiled(function):
    """`function` compiled as a decode step is: `jax.jit`, or a TensorFlow
    function compiled by XLA."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(function)
    import tensorflow as tf

    return tf.function(function, jit_compile=True)


@pytest.mark.parametrize(
    "dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-4), ("float16", 2e-4)]
)
@pytest.mark.parametrize("count", [1, 5])
def test_product_matches_float64(integer_product, dtype, tolerance, count):
    """fbgemm's product on PyTorch, XLA's (compiled) elsewhere."""
    rng = np.random.default_rng(count)
    weight = rng.integers(-127, 128, (300, 96)).astype("int8")
    rows = keras.ops.cast(rng.normal(size=(count, 96)), dtype)
    if keras.backend.backend() == "torch":
        import torch

        multiply = integer_product.rows_times_transpose
        weight_tensor = torch.from_numpy(weight)
    else:
        multiply = _compiled(integer_product.xla_rows_times_transpose)
        weight_tensor = weight
    product = multiply(rows, weight_tensor)
    assert keras.backend.standardize_dtype(product.dtype) == "float32"
    assert tuple(product.shape) == (count, 300)
    expected = keras.ops.convert_to_numpy(keras.ops.cast(rows, "float32")).astype(
        "float64"
    ) @ weight.T.astype("float64")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(product),
        expected,
        atol=tolerance * np.abs(expected).max(),
    )


@xla_only
def test_xla_product_gradient_is_the_converted_weights(integer_product):
    """Rounding the rows into parts has no gradient: the rows' gradient is
    that of the float product."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (40, 16)).astype("int8")
    rows = rng.normal(size=(2, 16)).astype("float32")
    upstream = rng.normal(size=(2, 40)).astype("float32")
    if keras.backend.backend() == "jax":
        import jax

        def loss(rows):
            return (
                integer_product.xla_rows_times_transpose(rows, weight) * upstream
            ).sum()

        gradient = jax.jit(jax.grad(loss))(rows)
    else:
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def gradient_of(rows):
            with tf.GradientTape() as tape:
                tape.watch(rows)
                product = integer_product.xla_rows_times_transpose(rows, weight)
                loss = tf.reduce_sum(product * upstream)
            return tape.gradient(loss, rows)

        gradient = gradient_of(tf.constant(rows))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gradient),
        upstream @ weight.astype("float32"),
        rtol=1e-5,
    )


@xla_only
@pytest.mark.parametrize("multiplies_bytes", [True, False])
def test_vocabulary_sized_int8_weights_go_through_xla_integer_product(
    monkeypatch, multiplies_bytes
):
    """On CPUs with byte dot products (VNNI), `storage_layout`'s int8
    products use it from `_MIN_INTEGER_PRODUCT_OUTPUTS` outputs and up to
    `_MAX_ROWS_ONE_AT_A_TIME` rows, for float32 and 16-bit rows; elsewhere
    they convert the weights."""
    from keras_gemma.layers import integer_product, storage_layout

    calls = _parts_of_each_call(monkeypatch, "_xla_product")
    monkeypatch.setattr(
        integer_product, "cpu_multiplies_bytes", lambda: multiplies_bytes
    )
    monkeypatch.setattr(storage_layout, "_MIN_INTEGER_PRODUCT_OUTPUTS", 64)
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (64, 32)).astype("int8")
    rows = rng.normal(size=(17, 32)).astype("float32")
    cases = [
        ("float32", 2, 3, 1e-6),
        ("bfloat16", 3, 2, 1e-2),
        ("float32", 17, None, 1e-6),
    ]
    for dtype, count, parts, tolerance in cases:
        calls.clear()
        rounded = keras.ops.cast(rows[:count], dtype)
        outputs = _compiled(
            lambda rows, dtype=dtype: storage_layout.rows_times_converted_transpose(
                rows, weight, dtype
            )
        )(rounded)
        expected_calls = [parts] if multiplies_bytes and parts else []
        assert calls == expected_calls, (dtype, count)
        assert keras.backend.standardize_dtype(outputs.dtype) == dtype
        expected = keras.ops.convert_to_numpy(
            keras.ops.cast(rounded, "float32")
        ).astype("float64") @ weight.T.astype("float64")
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")),
            expected,
            atol=tolerance * np.abs(expected).max(),
        )
    calls.clear()
    _compiled(
        lambda rows: storage_layout.rows_times_converted_transpose(
            rows, weight[:63], "float32"
        )
    )(rows[:2])
    assert calls == []


def test_byte_dot_products_read_from_the_cpu_flags(tmp_path, monkeypatch):
    from keras_gemma.layers import integer_product, storage_layout

    cpuinfo = tmp_path / "cpuinfo"
    read = storage_layout.cpu_flags
    monkeypatch.setattr(storage_layout, "cpu_flags", lambda: read(cpuinfo))
    for flags, expected in [
        ("fpu avx2 avx512_vnni", True),
        ("fpu avx2 avx_vnni", True),
        ("fpu avx2 fma", False),
    ]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        integer_product.cpu_multiplies_bytes.cache_clear()
        assert integer_product.cpu_multiplies_bytes() is expected
    integer_product.cpu_multiplies_bytes.cache_clear()
    assert read(tmp_path / "none") == set()
