"""Low-rank adapters (LoRA) on a GemmaBackbone, saved and restored by name."""

import json
import numbers

import keras
import numpy as np

# Each adaptable projection, by the name users pass in `target_names`.
LORA_TARGETS = {
    "query": lambda block: block.attention.query,
    "key": lambda block: block.attention.key,
    "value": lambda block: block.attention.value,
    "attention_output": lambda block: block.attention.attention_output,
    "gate": lambda block: block.ffw.gate,
    "up": lambda block: block.ffw.up,
    "down": lambda block: block.ffw.down,
}
DEFAULT_LORA_TARGETS = ("query", "value")

_METADATA_KEY = "keras_gemma_lora"


def relative_path(backbone, variable):
    """A variable's path inside the backbone, without the backbone's name."""
    prefix = backbone.name + "/"
    path = variable.path
    return path[len(prefix) :] if path.startswith(prefix) else path


def _check_target_names(target_names):
    """The list of projection names to adapt, checked before any change."""
    if target_names is None:
        return list(DEFAULT_LORA_TARGETS)
    if isinstance(target_names, (str, bytes)):
        raise ValueError(
            "`target_names` must be a list of projection names, e.g. "
            f"[{target_names!r}], got the string {target_names!r}."
        )
    target_names = list(target_names)
    if not target_names:
        raise ValueError(
            "`target_names` is empty: name at least one projection from "
            f"{sorted(LORA_TARGETS)}, or pass None for {list(DEFAULT_LORA_TARGETS)}."
        )
    unknown = []
    for name in target_names:
        known = isinstance(name, str) and name in LORA_TARGETS
        if not known and name not in unknown:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"Unknown `target_names` {unknown}; choose from {sorted(LORA_TARGETS)}."
        )
    repeated = sorted({name for name in target_names if target_names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"`target_names` names {repeated} more than once; give each "
            "projection once."
        )
    return target_names


def enable_lora(backbone, rank, target_names=None, alpha=None):
    """Adds adapters to the target projections and freezes everything else."""
    if backbone.lora_settings is not None:
        raise ValueError(
            "LoRA is already enabled on this backbone (rank "
            f"{backbone.lora_settings['rank']}); call `enable_lora` once."
        )
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    rank = int(rank)
    if alpha is not None and (
        not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or alpha <= 0
    ):
        raise ValueError(f"`alpha` must be a positive number or None, got {alpha!r}.")
    target_names = _check_target_names(target_names)
    for variable in backbone.weights:
        variable.trainable = False
    for block in backbone.transformer_layers:
        for name in target_names:
            LORA_TARGETS[name](block).enable_lora(rank, lora_alpha=alpha)
    backbone.lora_settings = {
        "rank": rank,
        "alpha": float(alpha if alpha is not None else rank),
        "target_names": target_names,
    }


def lora_variables(backbone):
    """The adapter variables, keyed by their path inside the backbone."""
    return {
        relative_path(backbone, variable): variable
        for variable in backbone.weights
        if "lora_kernel" in variable.path
    }


def save_lora_weights(backbone, path):
    """Writes the adapters to a safetensors file keyed by layer path."""
    from safetensors.numpy import save_file

    if backbone.lora_settings is None:
        raise ValueError("This backbone has no LoRA adapters: call `enable_lora`.")
    tensors = {
        key: np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        for key, variable in lora_variables(backbone).items()
    }
    metadata = {_METADATA_KEY: json.dumps(backbone.lora_settings)}
    save_file(tensors, str(path), metadata=metadata)


def load_lora_weights(backbone, path):
    """Restores adapters saved by `save_lora_weights`, matched by name.

    LoRA is enabled with the saved rank, alpha and targets if it is not
    enabled yet. Every adapter of the backbone must be in the file with the
    same shape, and the file may hold no other adapter: nothing is assigned
    unless all of them match.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as file:
        metadata = file.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{path} was not written by `save_lora_weights`.")
        settings = json.loads(metadata[_METADATA_KEY])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    if backbone.lora_settings is None:
        enable_lora(
            backbone,
            settings["rank"],
            target_names=settings["target_names"],
            alpha=settings["alpha"],
        )
    elif _comparable(backbone.lora_settings) != _comparable(settings):
        raise ValueError(
            f"{path} holds adapters with settings {settings}, but this backbone "
            f"has {backbone.lora_settings}."
        )
    variables = lora_variables(backbone)
    missing = sorted(set(variables) - set(tensors))
    extra = sorted(set(tensors) - set(variables))
    if missing or extra:
        raise ValueError(
            f"Adapters in {path} do not match this backbone's layers: missing "
            f"{missing[:5]}, unexpected {extra[:5]}."
        )
    for key, variable in variables.items():
        if tuple(tensors[key].shape) != tuple(variable.shape):
            raise ValueError(
                f"Adapter {key!r} in {path} has shape {tensors[key].shape}, "
                f"expected {tuple(variable.shape)}."
            )
    for key, variable in variables.items():
        variable.assign(tensors[key])


def _comparable(settings):
    return dict(settings, target_names=sorted(settings["target_names"]))


def merged_weights(backbone):
    """Every weight by path, with the adapters folded into their kernels."""
    values = {}
    adapted = {}
    for block in backbone.transformer_layers:
        for getter in LORA_TARGETS.values():
            layer = getter(block)
            if getattr(layer, "lora_enabled", False):
                adapted[relative_path(backbone, layer._kernel)] = layer
    for variable in backbone.weights:
        key = relative_path(backbone, variable)
        if "lora_kernel" in key:
            continue
        value = adapted[key].kernel if key in adapted else variable
        values[key] = keras.ops.convert_to_numpy(value)
    return values


def merge_lora_weights(backbone):
    """A new backbone without adapters whose kernels include them."""
    config = dict(backbone.get_config(), lora=None)
    merged = type(backbone).from_config(config)
    values = merged_weights(backbone)
    for variable in merged.weights:
        variable.assign(values[relative_path(merged, variable)])
    return merged
