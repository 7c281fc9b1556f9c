"""Building a backbone for a checkpoint without initializing it at random.

Random initialization of a model's variables is wasted work when every one
is about to be overwritten by a checkpoint, and it is slow: 9 to 24 s for
Gemma 3 270M on a 2-core CPU, most of it JAX compiling one random kernel
per weight shape. `uninitialized_backbone` creates the variables inside a
`keras.StatelessScope(initialize_variables=False)`, which defers their
initialization, and `assign` then initializes each variable directly with
its checkpoint value, through Keras's deferred-initialization path.
"""

import contextlib

import numpy as np


def numpy_dtype(dtype):
    """The numpy dtype of a Keras dtype name (`bfloat16` via ml_dtypes).

    Example:

    >>> str(numpy_dtype("bfloat16")), str(numpy_dtype("float32"))
    ('bfloat16', 'float32')
    """
    import keras
    import ml_dtypes

    dtype = keras.backend.standardize_dtype(dtype)
    if dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _pending_registry():
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        return None
    return global_state


@contextlib.contextmanager
def uninitialized_backbone(config, dtype=None):
    """Yields a `GemmaBackbone(**config, dtype=dtype)` whose variables are not
    initialized yet; assign every one with `assign` inside the block.

    Variables left unassigned when the block ends get their normal
    initialization, so the backbone is always usable afterwards.

    Example:

    >>> config = dict(vocabulary_size=32, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=4)
    >>> with uninitialized_backbone(config) as backbone:
    ...     for variable in backbone.weights:
    ...         assign(variable, np.ones(variable.shape))
    >>> float(backbone.final_norm.scale.numpy()[0])
    1.0
    """
    import keras

    from keras_gemma.models.gemma_backbone import GemmaBackbone

    # On PyTorch, quantizing (as a config with `quantization` does at
    # construction) re-tracks the layers' parameters, which needs them
    # initialized.
    quantized_on_torch = (
        config.get("quantization") and keras.backend.backend() == "torch"
    )
    if quantized_on_torch or not _supports_deferred_variables():
        backbone = GemmaBackbone(**config, dtype=dtype)
        yield backbone
        return
    earlier = _pending_variables()
    with keras.StatelessScope(initialize_variables=False):
        backbone = GemmaBackbone(**config, dtype=dtype)
    try:
        yield backbone
    finally:
        _finish(backbone, earlier)


def _supports_deferred_variables():
    import keras

    try:
        keras.StatelessScope(initialize_variables=False)
    except TypeError:
        return False
    return _pending_registry() is not None


def _pending_variables():
    """Keras's variables awaiting initialization (when a stateless scope
    ends), as a list."""
    return list(
        _pending_registry().get_global_attribute("uninitialized_variables") or []
    )


def _finish(backbone, earlier):
    """Initializes what was left unassigned, and removes every variable
    created with the backbone from Keras's list of variables awaiting
    initialization: its own, now initialized, and those quantization
    replaced, which would otherwise be initialized (and allocated) for
    nothing when the next stateless scope ends."""
    for variable in backbone.variables:
        if getattr(variable, "_value", 0) is None:
            variable._deferred_initialize()
    kept = {id(variable) for variable in earlier}
    _pending_registry().set_global_attribute(
        "uninitialized_variables",
        [variable for variable in _pending_variables() if id(variable) in kept],
    )


# XLA (JAX) and TensorFlow on CPU use a host array in place only if it
# starts at a multiple of this; otherwise they copy it, slowly.
_ALIGNMENT = 64
# Below this size a value goes through Keras's conversion as it is.
_SMALL_BYTES = 1 << 20
# What TensorFlow takes through DLPack (not ml_dtypes' bfloat16).
_DLPACK_DTYPES = (np.float32, np.float16, np.int8)


def aligned_empty(shape, dtype):
    """An uninitialized C-order numpy array whose data starts on a 64-byte
    boundary (numpy aligns large arrays to 16 bytes only), which JAX and
    TensorFlow can use without copying it.

    Example:

    >>> aligned_empty((3, 5), "float32").ctypes.data % 64
    0
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + size].view(dtype).reshape(shape)


def _is_aligned(value):
    return value.flags.c_contiguous and value.ctypes.data % _ALIGNMENT == 0


def _backend_tensor(value, owned):
    """The numpy array `value` as a tensor of the backend, copied at most
    once; not copied at all where `owned` and already laid out as the
    backend needs.

    JAX and TensorFlow copy a host array given to them at about 0.7 GB/s
    here (1.6 s for TensorFlow's `constant` of the 671 MB vocabulary table;
    a transposed view is made contiguous first, slower still), unless it
    is C-ordered and 64-byte aligned, when they use it in place. So the
    value is copied at memory speed into such an array of our own, or
    handed over as it is when the loader `owned` such an array. PyTorch
    takes over an `owned` array (`storage_layout` copies it only if it
    needs another layout). Everything else is left to Keras's conversion.
    Measured, `from_preset` of the 270M GGUF preset (float32): JAX 3.0 ->
    2.3 s, TensorFlow 4.2 -> 2.5 s, PyTorch 3.5 -> 2.3 s (with the copies
    of `storage_layout`).
    """
    import keras

    from keras_gemma.layers import storage_layout

    backend = keras.backend.backend()
    if backend == "torch":
        return storage_layout.as_torch_tensor(value) if owned else value
    if not storage_layout.is_xla_on_cpu() or value.nbytes < _SMALL_BYTES:
        return value
    if backend == "tensorflow" and value.dtype not in _DLPACK_DTYPES:
        return value
    if not (owned and _is_aligned(value)):
        value = storage_layout.copy_in_blocks(
            aligned_empty(value.shape, value.dtype), value
        )
    if backend == "jax":
        import jax

        return jax.device_put(value)
    import tensorflow as tf

    return tf.experimental.dlpack.from_dlpack(value.__dlpack__())


def assign(variable, value, owned=False):
    """Sets `variable` to the numpy array `value` (cast to its dtype),
    initializing it if it was created uninitialized.

    `owned=True` says `value` (or the array it views) is the caller's own,
    freshly made and dropped after: the variable may then keep its memory
    instead of copying it. Leave it `False` for memory-mapped files.
    """
    source = value
    value = np.asarray(value).astype(numpy_dtype(variable.dtype), copy=False)
    # A cast made a new array: ours.
    owned = owned or (
        isinstance(source, np.ndarray) and not np.may_share_memory(value, source)
    )
    if getattr(variable, "_value", 0) is None and hasattr(
        variable, "_deferred_initialize"
    ):
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Cannot assign a value of shape {value.shape} to {variable.path} "
                f"of shape {tuple(variable.shape)}."
            )
        order = getattr(variable._initializer, "memory_order", None)
        value = _backend_tensor(value, owned)
        variable._initializer = lambda shape, dtype=None: value
        if order is not None:  # the layer's storage layout (PyTorch)
            from keras_gemma.layers import storage_layout

            variable._initializer = storage_layout.initializer_with_memory_order(
                variable._initializer, order
            )
        variable._deferred_initialize()
    else:
        variable.assign(value)
