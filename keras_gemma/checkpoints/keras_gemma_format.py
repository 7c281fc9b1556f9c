"""keras-gemma's own preset format.

A preset directory holds:

- `config.json`: `{"format": "keras-gemma", "format_version": 1,
  "backbone": {GemmaBackbone arguments} or null, "weights": {...},
  "tokenizer": "tokenizer.model" or null, "metadata": {...}}`;
- `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards and
  `model.safetensors.index.json`), keyed by the backbone's variable paths
  without the model name (`decoder_block_0/attention/query/kernel`), in
  the backbone's own layouts and dtype;
- `tokenizer.model`: the SentencePiece model;
- `preprocessor.json` (optional): `GemmaCausalLMPreprocessor` settings.

Saving is atomic: files are written into a temporary sibling directory
which then replaces the target, so a crash leaves an earlier preset intact.
Saving only a backbone into an existing preset keeps its tokenizer (and
the other way round).
"""

import json
import os

import keras
import numpy as np

from keras_gemma.checkpoints import atomic_directory as atomic
from keras_gemma.checkpoints.safetensors_reader import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsCheckpoint,
    checkpoint_files,
    write_safetensors,
)
from keras_gemma.checkpoints.sources import FORMAT_MARKER
from keras_gemma.checkpoints.variables import assign, numpy_dtype

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PREPROCESSOR_FILE = "preprocessor.json"
_PREPROCESSOR_KEYS = ("sequence_length", "add_start_token", "add_end_token")
_NOT_ARCHITECTURE = ("name", "trainable", "dtype")


def variable_key(variable):
    """A variable's path without the model name: stable across instances."""
    path = variable.path
    return path.split("/", 1)[1] if "/" in path else path


def variable_array(variable, dtype=None):
    """The value of a Keras variable as a numpy array of `dtype`."""
    value = keras.ops.convert_to_numpy(variable.value)
    return np.asarray(value).astype(dtype or numpy_dtype(variable.dtype), copy=False)


def architecture_config(backbone):
    """The `GemmaBackbone` arguments that define `backbone`'s architecture."""
    config = backbone.get_config()
    return {key: value for key, value in config.items() if key not in _NOT_ARCHITECTURE}


def read_config(directory):
    """The `config.json` of a keras-gemma preset directory."""
    path = os.path.join(directory, CONFIG_FILE)
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    if config.get("format") != FORMAT_MARKER:
        raise ValueError(f"{path} is not a keras-gemma preset config.")
    version = config.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this keras-gemma reads up to "
            f"{FORMAT_VERSION}. Upgrade keras-gemma."
        )
    return config


def backbone_config(directory):
    """`GemmaBackbone` arguments of a keras-gemma preset directory."""
    config = read_config(directory)
    if not config.get("backbone"):
        raise ValueError(
            f"The keras-gemma preset {directory!r} holds no backbone (it was saved "
            "from a tokenizer or preprocessor only)."
        )
    return dict(config["backbone"])


def load_weights(backbone, directory):
    """Assigns the weights of a keras-gemma preset to `backbone`, after checking
    every name and shape."""
    checkpoint = SafetensorsCheckpoint(checkpoint_files(directory))
    variables = {variable_key(variable): variable for variable in backbone.weights}
    missing = sorted(set(variables) - set(checkpoint.keys()))
    unexpected = sorted(set(checkpoint.keys()) - set(variables))
    if missing or unexpected:
        raise ValueError(
            f"The weights in {directory!r} do not match the configuration: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    for key, variable in variables.items():
        if checkpoint.shape(key) != tuple(variable.shape):
            raise ValueError(
                f"Tensor {key!r} in {directory!r} has shape {checkpoint.shape(key)}; "
                f"the configuration implies {tuple(variable.shape)}."
            )
    for key, variable in variables.items():
        assign(variable, checkpoint.get(key))


def tokenizer_proto(directory):
    """The SentencePiece model bytes of a keras-gemma preset directory."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"The keras-gemma preset {directory!r} has no {TOKENIZER_FILE}: it was "
            "saved from a backbone alone. Save the tokenizer (or the whole "
            "GemmaCausalLM) into it with `save_to_preset`."
        )
    with open(path, "rb") as file:
        return file.read()


def preprocessor_settings(directory):
    """Saved `GemmaCausalLMPreprocessor` settings (empty when none)."""
    path = os.path.join(directory, PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        settings = json.load(file)
    return {key: settings[key] for key in _PREPROCESSOR_KEYS if key in settings}


def _weight_entries(backbone):
    entries = []
    for variable in backbone.weights:
        dtype = numpy_dtype(variable.dtype)
        entries.append(
            (
                variable_key(variable),
                tuple(variable.shape),
                dtype,
                lambda variable=variable, dtype=dtype: variable_array(variable, dtype),
            )
        )
    return entries


def _existing_preset(directory):
    """The config of the keras-gemma preset already at `directory`, `{}` for
    an empty or missing directory; raises for any other content."""
    if not os.path.exists(directory):
        return {}
    if not os.path.isdir(directory):
        raise ValueError(f"`directory` {directory!r} is a file, not a directory.")
    if not os.listdir(directory):
        return {}
    try:
        return read_config(directory)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"`directory` {directory!r} exists and is not a keras-gemma preset; "
            "refusing to replace its files. Give a new or empty directory."
        ) from error


def save_preset(
    directory,
    backbone=None,
    tokenizer=None,
    preprocessor_config=None,
    metadata=None,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
):
    """Writes the given components as a keras-gemma preset, atomically.

    Components left out (`None`) are carried over from a keras-gemma preset
    already at `directory`.

    Args:
        directory: the preset directory (created or replaced).
        backbone: a `GemmaBackbone`, or `None`.
        tokenizer: a `GemmaTokenizer`, or `None`.
        preprocessor_config: `GemmaCausalLMPreprocessor` settings to store in
            `preprocessor.json`, or `None`.
        metadata: extra JSON-serializable facts for `config.json`.
        max_shard_size: bytes (or `"5GB"`-style string) per weight file.
    """
    from keras_gemma import __version__

    directory = os.path.abspath(os.fspath(directory))
    previous = _existing_preset(directory)
    config = {
        "format": FORMAT_MARKER,
        "format_version": FORMAT_VERSION,
        "keras_gemma_version": __version__,
        "backbone": previous.get("backbone"),
        "weights": previous.get("weights"),
        "tokenizer": previous.get("tokenizer"),
        "metadata": dict(previous.get("metadata") or {}),
    }
    if metadata:
        config["metadata"].update(metadata)
    with atomic.atomic_directory(directory) as staging:
        kept = []
        if backbone is None and previous.get("backbone"):
            # config.json is always written anew (never hard-linked: writing
            # to a link would change the old preset too).
            kept += [os.path.basename(path) for path in checkpoint_files(directory)]
            if os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
                kept.append("model.safetensors.index.json")
        if tokenizer is None:
            kept.append(TOKENIZER_FILE)
        if preprocessor_config is None:
            kept.append(PREPROCESSOR_FILE)
        if previous:
            atomic.keep_files(directory, staging, kept)
        if backbone is not None:
            files = write_safetensors(
                staging,
                _weight_entries(backbone),
                max_shard_size=max_shard_size,
                metadata={"format": "keras-gemma"},
            )
            config["backbone"] = architecture_config(backbone)
            config["weights"] = {
                "dtype": keras.backend.standardize_dtype(backbone.variable_dtype),
                "parameter_count": int(backbone.count_params()),
                "files": files,
            }
        if tokenizer is not None:
            with open(os.path.join(staging, TOKENIZER_FILE), "wb") as file:
                file.write(tokenizer.proto)
            config["tokenizer"] = TOKENIZER_FILE
        if preprocessor_config is not None:
            settings = {
                key: preprocessor_config[key]
                for key in _PREPROCESSOR_KEYS
                if key in preprocessor_config
            }
            with open(os.path.join(staging, PREPROCESSOR_FILE), "w") as file:
                json.dump(settings, file, indent=2)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2)
            file.write("\n")
    return directory
