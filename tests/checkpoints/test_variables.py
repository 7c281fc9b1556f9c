"""Assigning loaded values: copied unless the loader owns them, kept in
place (no copy) where it does and the layout allows."""

import keras
import numpy as np
import pytest

from keras_gemma.checkpoints.variables import (
    aligned_empty,
    assign,
    numpy_dtype,
    uninitialized_backbone,
)
from tests.tiny_configs import tiny_config

# The embedding table is 1 MiB in float32: large enough to be handed over.
CONFIG = tiny_config(vocabulary_size=8192)


def _numpy(variable):
    return keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))


def _stored_reversed(value):
    """`value` as a view of an aligned array holding its axes reversed, as
    a transposed kernel of a checkpoint is."""
    reversed_value = aligned_empty(value.shape[::-1], value.dtype)
    reversed_value[...] = value.transpose()
    return reversed_value.transpose()


def _load(dtype, owned, layout):
    rng = np.random.default_rng(0)
    given = {}
    with uninitialized_backbone(CONFIG, dtype=dtype) as backbone:
        for variable in backbone.weights:
            value = rng.normal(size=variable.shape).astype("float32")
            if layout == "reversed":
                value = _stored_reversed(value)
            elif layout == "aligned":
                aligned = aligned_empty(value.shape, value.dtype)
                aligned[...] = value
                value = aligned
            given[variable.path] = value
            assign(variable, value, owned=owned)
    return backbone, given


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["aligned", "reversed"])
def test_values_not_owned_are_copied(dtype, layout):
    backbone, given = _load(dtype, owned=False, layout=layout)
    expected = {
        path: value.astype(numpy_dtype(dtype)).astype("float32")
        for path, value in given.items()
    }
    for value in given.values():
        value[...] = 0  # the loader reuses its memory
    for variable in backbone.weights:
        np.testing.assert_array_equal(_numpy(variable), expected[variable.path])


@pytest.mark.parametrize("layout", ["aligned", "reversed"])
def test_owned_values_load_exactly(layout):
    backbone, given = _load("float32", owned=True, layout=layout)
    for variable in backbone.weights:
        np.testing.assert_array_equal(_numpy(variable), given[variable.path])
    # The model runs on them.
    token_ids = np.array([[2, 7, 9]])
    hidden = backbone({"token_ids": token_ids, "padding_mask": np.ones((1, 3))})
    assert np.isfinite(_numpy(hidden)).all()


def test_an_owned_aligned_table_is_kept_in_place():
    """The float32 embedding table, owned and aligned, becomes the
    variable's memory on JAX and TensorFlow on CPU (no copy); on PyTorch it
    is stored column-major, so copied once; an owned kernel already in
    PyTorch's layout is kept."""
    backbone, given = _load("float32", owned=True, layout="aligned")
    table = backbone.token_embedding.embeddings
    source = given[table.path]
    backend = keras.backend.backend()
    if backend == "jax":
        assert table.value.unsafe_buffer_pointer() == source.ctypes.data
    elif backend == "tensorflow":
        source[0, 0] = 123.0  # shared memory: seen through the variable
        assert _numpy(table)[0, 0] == 123.0
    else:
        assert table.value.data_ptr() != source.ctypes.data
        backbone, given = _load("float32", owned=True, layout="reversed")
        kernel = backbone.transformer_layers[0].ffw.gate._kernel
        assert kernel.value.data_ptr() == given[kernel.path].ctypes.data
