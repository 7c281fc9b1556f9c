"""Rotary position embedding (RoPE) in the half-split layout Gemma uses."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class RotaryEmbedding(keras.layers.Layer):
    """Rotates query or key vectors by angles that grow with position.

    The feature axis is split in two halves `(x1, x2)`; pair `i` is rotated
    by `position / scaling_factor * max_wavelength ** (-2 i / head_dim)`.
    Angles are computed in float32.

    Args:
        max_wavelength: the RoPE base frequency (10,000 or 1,000,000 for
            Gemma).
        scaling_factor: linear position scaling; positions are divided by
            it (Gemma 3 global layers of the 4B and larger models use 8).

    Call arguments:
        inputs: tensor of shape `(batch, length, heads, head_dim)`.
        positions: integer tensor of shape `(batch, length)`.

    Example:

    >>> import numpy as np
    >>> rope = RotaryEmbedding(max_wavelength=10000)
    >>> x = np.ones((1, 3, 2, 8), dtype="float32")
    >>> y = rope(x, positions=np.array([[0, 1, 2]]))
    >>> bool(np.allclose(keras.ops.convert_to_numpy(y)[0, 0], 1.0))
    True
    """

    def __init__(self, max_wavelength=10000.0, scaling_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        if max_wavelength <= 0:
            raise ValueError(
                f"`max_wavelength` must be positive, got {max_wavelength}."
            )
        if scaling_factor <= 0:
            raise ValueError(
                f"`scaling_factor` must be positive, got {scaling_factor}."
            )
        self.max_wavelength = float(max_wavelength)
        self.scaling_factor = float(scaling_factor)
        self.built = True  # no weights

    def quantize(self, mode=None, type_check=True, config=None):
        """Left unquantized: this layer is tiny and precision-critical."""

    def cos_sin(self, positions, head_dim):
        """Returns `(cos, signed_sin)`, each `(batch, length, 1, head_dim)`:
        the sines negated on the first half, as `apply_rotary` takes them."""
        exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
        inverse_frequency = 1.0 / (self.max_wavelength**exponents)
        inverse_frequency = inverse_frequency / self.scaling_factor
        angles = ops.cast(positions, "float32")[..., None] * inverse_frequency
        angles = angles[:, :, None, :]
        cos, sin = ops.cos(angles), ops.sin(angles)
        return (
            ops.concatenate([cos, cos], axis=-1),
            ops.concatenate([-sin, sin], axis=-1),
        )

    def call(self, inputs, positions):
        cos, sin = self.cos_sin(positions, inputs.shape[-1])
        return apply_rotary(inputs, cos, sin)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_wavelength": self.max_wavelength,
                "scaling_factor": self.scaling_factor,
            }
        )
        return config


def apply_rotary(x, cos, signed_sin):
    """Applies the rotation `(cos, signed_sin)` from `cos_sin` to `x`,
    keeping its dtype: each half-split pair `(x1, x2)` becomes
    `(x1 cos - x2 sin, x2 cos + x1 sin)`.

    The halves are swapped by one roll and the sign is in `signed_sin`
    (computed once for all layers), instead of a split, a negation and a
    concatenation per call: on PyTorch, whose recorded decode step runs
    each operation separately, 144 operations fewer per token for the
    270M model."""
    dtype = x.dtype
    x = ops.cast(x, "float32")
    swapped = ops.roll(x, x.shape[-1] // 2, axis=-1)
    return ops.cast(x * cos + swapped * signed_sin, dtype)
