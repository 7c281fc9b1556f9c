"""Writing new keys and values into a preallocated per-layer cache."""

import keras
from keras import ops


def write_cache(cache, update, index):
    """Writes `update` into `cache` along axis 1, starting at `index`.

    `cache` is `(batch, cache_length, kv_heads, head_dim)` and `update` is
    `(batch, steps, kv_heads, head_dim)`. On PyTorch the cache tensor is
    modified in place (no copy of the whole cache per step); on JAX and
    TensorFlow the functional update becomes an in-place write under XLA
    when the cache is a loop carry or a donated buffer.
    """
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            steps = update.shape[1]
            if isinstance(index, int):
                cache[:, index : index + steps] = update.to(cache.dtype)
            else:
                positions = torch.as_tensor(index, device=cache.device).reshape(())
                positions = positions + torch.arange(steps, device=cache.device)
                cache.index_copy_(1, positions, update.to(cache.dtype))
        return cache
    update = ops.cast(update, cache.dtype)
    zero = ops.zeros((), dtype="int32")
    start = [zero, ops.cast(index, "int32"), zero, zero]
    return ops.slice_update(cache, start, update)
