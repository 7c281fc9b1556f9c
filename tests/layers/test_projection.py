"""`Projection` against Keras's `EinsumDense` holding the same weights: the
float product, int8 (weights only, and with int8 activations), LoRA on int8
and the transposed int8 storage's save and reload."""

import keras
import numpy as np
import pytest
from keras.quantizers import Int8QuantizationConfig

from keras_gemma.layers.projection import Projection

# (equation, output shape, input shape) of each projection a Gemma block has.
EQUATIONS = [
    ("btd,df->btf", (None, 12), (8,)),
    ("btf,fd->btd", (None, 8), (12,)),
    ("btd,ndh->btnh", (None, 3, 4), (8,)),
    ("bsd,kdh->bskh", (None, 1, 4), (8,)),
    ("btnh,nhd->btd", (None, 8), (3, 4)),
    # Not a Gemma projection: its int8 product is no plain matrix product.
    ("btd,df->bft", (12, None), (8,)),
]
WEIGHTS_ONLY = Int8QuantizationConfig(activation_quantizer=None)


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _pair(equation, output_shape, feature_shape, seed=0):
    """A `Projection` and an `EinsumDense` with the same random kernel."""
    rng = np.random.default_rng(seed)
    layers = []
    for layer_class in (Projection, keras.layers.EinsumDense):
        layer = layer_class(equation, output_shape=output_shape)
        layer.build((None, None) + feature_shape)
        layers.append(layer)
    kernel = rng.normal(size=layers[0].kernel.shape).astype("float32")
    for layer in layers:
        layer.kernel.assign(kernel)
    return layers


def _inputs(feature_shape, rows, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1, rows) + feature_shape).astype("float32")


# One row (decoding), a few (multiplied one at a time on JAX) and many.
@pytest.mark.parametrize("rows", [1, 5, 20])
@pytest.mark.parametrize("equation, output_shape, feature_shape", EQUATIONS)
def test_float_and_int8_products_match_einsum_dense(
    equation, output_shape, feature_shape, rows
):
    ours, reference = _pair(equation, output_shape, feature_shape)
    x = _inputs(feature_shape, rows)
    np.testing.assert_allclose(_numpy(ours(x)), _numpy(reference(x)), atol=1e-5)
    for config in (WEIGHTS_ONLY, Int8QuantizationConfig()):
        ours, reference = _pair(equation, output_shape, feature_shape)
        ours.quantize("int8", config=config)
        reference.quantize("int8", config=config)
        # Same int8 values and scales; only the storage order differs.
        np.testing.assert_array_equal(_numpy(ours.kernel), _numpy(reference.kernel))
        np.testing.assert_array_equal(
            _numpy(ours.kernel_scale), _numpy(reference.kernel_scale)
        )
        np.testing.assert_allclose(
            _numpy(ours(x)), _numpy(reference(x)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("equation, output_shape, feature_shape", EQUATIONS)
def test_int8_kernel_is_stored_with_the_contracted_axes_last(
    equation, output_shape, feature_shape
):
    layer, _ = _pair(equation, output_shape, feature_shape)
    float_shape = tuple(layer.kernel.shape)
    layer.quantize("int8", config=WEIGHTS_ONLY)
    kernel_letters = equation.split("->")[0].split(",")[1]
    output_letters = equation.split("->")[1]
    stored = tuple(layer._kernel.shape)
    kept = [
        n for n, letter in zip(float_shape, kernel_letters) if letter in output_letters
    ]
    contracted = [
        n
        for n, letter in zip(float_shape, kernel_letters)
        if letter not in output_letters
    ]
    assert stored == tuple(kept + contracted)
    assert tuple(layer.kernel.shape) == float_shape


@pytest.mark.parametrize("equation, output_shape, feature_shape", EQUATIONS)
def test_int8_layer_saves_and_reloads_its_outputs(
    equation, output_shape, feature_shape
):
    layer, _ = _pair(equation, output_shape, feature_shape)
    layer.quantize("int8", config=WEIGHTS_ONLY)
    store = {}
    layer.save_own_variables(store)
    # Rebuilt the way a saved model is: from its config with the int8 policy.
    rebuilt = Projection.from_config(layer.get_config())
    rebuilt.build((None, None) + feature_shape)
    rebuilt.load_own_variables(store)
    x = _inputs(feature_shape, 3)
    np.testing.assert_array_equal(_numpy(rebuilt(x)), _numpy(layer(x)))


def test_lora_on_int8_adds_its_update_and_merges_on_save():
    equation, output_shape, feature_shape = EQUATIONS[0]
    layer, _ = _pair(equation, output_shape, feature_shape)
    layer.quantize("int8", config=WEIGHTS_ONLY)
    x = _inputs(feature_shape, 2)
    base = _numpy(layer(x))
    layer.enable_lora(2)
    rng = np.random.default_rng(4)
    a = rng.normal(size=layer.lora_kernel_a.shape).astype("float32")
    b = rng.normal(size=layer.lora_kernel_b.shape).astype("float32")
    layer.lora_kernel_a.assign(a)
    layer.lora_kernel_b.assign(b)
    update = x @ (a @ b) * (layer.lora_alpha / layer.lora_rank)
    adapted = _numpy(layer(x))
    np.testing.assert_allclose(adapted, base + update, rtol=1e-4, atol=1e-4)

    # Saving merges the update into the int8 kernel, requantized; loading
    # zeroes the rebuilt layer's own LoRA weights.
    store = {}
    layer.save_own_variables(store)
    merged = Projection.from_config(layer.get_config())
    merged.build((None, None) + feature_shape)
    merged.load_own_variables(store)
    error = np.abs(_numpy(merged(x)) - adapted).max()
    assert error < 0.02 * np.abs(adapted).max()


def test_int8_activations_pass_a_straight_through_gradient():
    """Keras's int8-activation mode differentiates through the dequantized
    kernel; the transposed storage must not change that."""
    equation, output_shape, feature_shape = EQUATIONS[2]
    layer, reference = _pair(equation, output_shape, feature_shape)
    for each in (layer, reference):
        each.quantize("int8", config=Int8QuantizationConfig())
    x = _inputs(feature_shape, 2)
    gradients = [_input_gradient(each, x) for each in (layer, reference)]
    assert np.abs(gradients[0]).max() > 0
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-4)


def _input_gradient(layer, x):
    """d sum(layer(x)) / dx, on the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: layer(v).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(x)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(layer(variable))
        return tape.gradient(total, variable).numpy()
    import torch

    tensor = torch.tensor(x, requires_grad=True)
    layer(tensor).sum().backward()
    return tensor.grad.numpy()
