"""Resolving a preset argument and loading a backbone from it."""

import os

from keras_gemma.checkpoints import transformers_format
from keras_gemma.checkpoints.safetensors_reader import (
    SafetensorsCheckpoint,
    checkpoint_files,
)


def load_backbone(preset, dtype=None):
    """Builds a `GemmaBackbone` from `preset` with its weights loaded."""
    preset = os.fspath(preset)
    if os.path.isdir(preset):
        return load_transformers_backbone(preset, dtype=dtype)
    raise ValueError(
        f"Unknown preset {preset!r}: expected a local transformers checkpoint "
        "directory (config.json and *.safetensors)."
    )


def load_transformers_backbone(directory, dtype=None):
    """Converts a transformers Gemma checkpoint directory into a backbone.

    Tensors are read one at a time from memory-mapped files and cast
    straight to the target dtype, so peak memory stays near the size of the
    model in that dtype. Every tensor's name and shape is checked before
    any weight is loaded.
    """
    from keras_gemma.models.gemma_backbone import GemmaBackbone

    config, prefix = transformers_format.read_transformers_config(directory)
    checkpoint = SafetensorsCheckpoint(checkpoint_files(directory))
    backbone = GemmaBackbone(
        **transformers_format.backbone_config_from_transformers(config),
        dtype=dtype,
    )
    layout = transformers_format.weight_layout(backbone, prefix)
    for variable, key, transform in layout:
        if key not in checkpoint:
            raise ValueError(
                f"Tensor {key!r} is missing from the checkpoint in {directory!r}."
            )
        expected = transformers_format.transformers_shape(variable, transform)
        if checkpoint.shape(key) != expected:
            raise ValueError(
                f"Tensor {key!r} in {directory!r} has shape "
                f"{checkpoint.shape(key)}; the configuration implies {expected}."
            )
    for variable, key, transform in layout:
        value = transformers_format.to_variable_layout(
            checkpoint.get(key), variable, transform
        )
        variable.assign(value.astype(variable.dtype))
    return backbone
