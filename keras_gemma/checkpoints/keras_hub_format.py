"""Keras presets published by keras-hub (the format Kaggle serves).

A keras-hub preset directory holds:

- `config.json`: `{"module": ..., "class_name": "GemmaBackbone" or
  "Gemma3Backbone", "config": {...}, "registered_name":
  "keras_hub>GemmaBackbone"}`. keras-hub's `intermediate_dim` is the width
  of both feed-forward branches together for `GemmaBackbone` (twice the
  per-branch width) and the per-branch width for `Gemma3Backbone`;
  `query_head_dim_normalize=False` scales queries by
  `hidden_dim / num_query_heads`; `use_sliding_window_attention` makes the
  even layers local (Gemma 2) or five layers in six local (Gemma 3).
- `model.weights.h5` (or `model.weights.json` with `model_NNNNN.weights.h5`
  shards): the backbone saved by Keras 3, whose groups follow the layer
  structure: `layers/reversible_embedding/vars/0`, then per decoder block
  `layers/gemma_decoder_block[_i]/` (`gemma3_decoder_block[_i]/`) with
  `pre_attention_norm`, `attention/{query,key,value,output}_dense`,
  `attention/{query,key}_norm` (Gemma 3), `post_attention_norm`,
  `pre_ffw_norm`, `gating_ffw`, `gating_ffw_2`, `ffw_linear`,
  `post_ffw_norm`, each with `vars/0`; the final norm is
  `layers/rms_normalization/vars/0`. Kernels have the same layouts as
  keras-gemma's; norms store `scale` with the same `1 + scale` convention.
  bfloat16 arrays are stored as 2-byte opaque values (with a `dtype`
  attribute in recent Keras versions).
- `assets/tokenizer/vocabulary.spm`: the SentencePiece model;
  `preprocessor.json` (the preprocessor's config, with `sequence_length`).
"""

import json
import os
import re

import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.variables import assign

_SUPPORTED = ("GemmaBackbone", "Gemma3Backbone")
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
TOKENIZER_ASSET = os.path.join("assets", "tokenizer", "vocabulary.spm")
_BLOCK_GROUP = re.compile(r"^(gemma3?_decoder_block)(?:_(\d+))?$")


def read_config(directory):
    """`(class_name, config)` of a keras-hub preset's `config.json`."""
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as file:
        serialized = json.load(file)
    registered = serialized.get("registered_name", "")
    class_name = serialized.get("class_name") or registered.split(">")[-1]
    if class_name not in _SUPPORTED:
        raise ValueError(
            f"{path} describes a keras-hub {class_name!r} ({registered}); "
            f"keras-gemma reads {list(_SUPPORTED)} presets."
        )
    return class_name, dict(serialized["config"])


def backbone_config_from_keras_hub(class_name, config):
    """`GemmaBackbone` arguments for a keras-hub backbone config.

    Example:

    >>> arguments = backbone_config_from_keras_hub("GemmaBackbone", {
    ...     "vocabulary_size": 256000, "num_layers": 26, "num_query_heads": 8,
    ...     "num_key_value_heads": 4, "hidden_dim": 2304,
    ...     "intermediate_dim": 18432, "head_dim": 256,
    ...     "use_post_ffw_norm": True, "use_post_attention_norm": True,
    ...     "final_logit_soft_cap": 30.0, "attention_logit_soft_cap": 50.0,
    ...     "use_sliding_window_attention": True, "sliding_window_size": 4096})
    >>> arguments["intermediate_dim"], arguments["layer_types"][:3]
    (9216, ['local', 'global', 'local'])
    """
    gemma3 = class_name == "Gemma3Backbone"
    if config.get("use_bidirectional_attention") or config.get("is_embedding_model"):
        raise ValueError(
            "This keras-hub Gemma 3 preset is an embedding model (bidirectional "
            "attention); keras-gemma loads causal language models only."
        )
    num_layers = config["num_layers"]
    hidden_dim = config["hidden_dim"]
    num_query_heads = config["num_query_heads"]
    head_dim = config["head_dim"]
    intermediate_dim = config["intermediate_dim"]
    if not gemma3:
        if intermediate_dim % 2:
            raise ValueError(
                "keras-hub's GemmaBackbone `intermediate_dim` counts both "
                f"feed-forward branches and must be even, got {intermediate_dim}."
            )
        intermediate_dim //= 2
    if config.get("query_head_dim_normalize", True):
        query_pre_attn_scalar = head_dim
    else:
        query_pre_attn_scalar = hidden_dim // num_query_heads
    sliding = bool(config.get("use_sliding_window_attention", False))
    if gemma3:
        pattern = int(config.get("sliding_window_pattern") or 6)
        layer_types = [
            "local" if sliding and (index + 1) % pattern else "global"
            for index in range(num_layers)
        ]
        rope_max_wavelength = {
            "global": float(config.get("global_rope_wavelength", 1_000_000.0)),
            "local": float(config.get("local_rope_wavelength", 10_000.0)),
        }
        rope_scaling_factor = {
            "global": float(config.get("global_rope_scaling_factor", 1.0)),
            "local": float(config.get("local_rope_scaling_factor", 1.0)),
        }
    else:
        layer_types = [
            "local" if sliding and index % 2 == 0 else "global"
            for index in range(num_layers)
        ]
        rope_max_wavelength = 10_000.0
        rope_scaling_factor = 1.0
    return {
        "vocabulary_size": config["vocabulary_size"],
        "num_layers": num_layers,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": config["num_key_value_heads"],
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window_size": config.get("sliding_window_size") if sliding else None,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attention_logit_soft_cap": config.get("attention_logit_soft_cap"),
        "final_logit_soft_cap": config.get("final_logit_soft_cap"),
        "use_query_key_norm": bool(gemma3 and config.get("use_query_key_norm", True)),
        "use_post_attention_norm": bool(config.get("use_post_attention_norm", False)),
        "use_post_ffw_norm": bool(config.get("use_post_ffw_norm", False)),
        "rope_max_wavelength": rope_max_wavelength,
        "rope_scaling_factor": rope_scaling_factor,
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
    }


class KerasWeightsFile:
    """Reads arrays from a Keras 3 `model.weights.h5` (or its shards) by path.

    Args:
        directory: the keras-hub preset directory.
    """

    def __init__(self, directory):
        import h5py

        single = os.path.join(directory, WEIGHTS_FILE)
        sharded = os.path.join(directory, SHARDED_WEIGHTS_FILE)
        if os.path.isfile(sharded):
            with open(sharded, encoding="utf-8") as file:
                weight_map = json.load(file)["weight_map"]
            names = set()
            for value in weight_map.values():
                names.update(value if isinstance(value, list) else [value])
            paths = [os.path.join(directory, name) for name in sorted(names)]
        elif os.path.isfile(single):
            paths = [single]
        else:
            raise ValueError(
                f"The keras-hub preset {directory!r} has no {WEIGHTS_FILE} (nor a "
                f"sharded {SHARDED_WEIGHTS_FILE})."
            )
        self._files = [h5py.File(path, "r") for path in paths]
        self.directory = directory

    def close(self):
        for file in self._files:
            file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def top_level_groups(self):
        """Names of the groups under `layers/`, over all shards."""
        names = set()
        for file in self._files:
            if "layers" in file:
                names.update(file["layers"].keys())
        return names

    def has(self, path):
        return any(path in file for file in self._files)

    def shape(self, path):
        """The shape of the array at `path`, without reading it."""
        for file in self._files:
            if path in file:
                return tuple(file[path].shape)
        self.get(path)  # Raises the missing-path error.

    def get(self, path):
        """The array at `path` (e.g. `layers/rms_normalization/vars/0`)."""
        for file in self._files:
            if path in file:
                dataset = file[path]
                array = dataset[()]
                is_bfloat16 = dataset.attrs.get("dtype") == "bfloat16" or (
                    array.dtype.kind == "V" and array.dtype.itemsize == 2
                )
                if is_bfloat16:
                    array = np.frombuffer(array.tobytes(), ml_dtypes.bfloat16).reshape(
                        array.shape
                    )
                return array
        raise ValueError(
            f"The keras-hub weights in {self.directory!r} have no {path!r}: the "
            "file does not match its config.json."
        )


def weight_layout(backbone, weights_file):
    """`(variable, h5_path)` for every variable of `backbone`."""
    groups = weights_file.top_level_groups()
    blocks = {}
    for name in groups:
        match = _BLOCK_GROUP.match(name)
        if match:
            blocks[int(match.group(2) or 0)] = name
    if sorted(blocks) != list(range(backbone.num_layers)):
        raise ValueError(
            f"The keras-hub weights in {weights_file.directory!r} hold decoder "
            f"blocks {sorted(blocks)}; config.json says {backbone.num_layers} layers."
        )

    def single(prefix):
        found = sorted(name for name in groups if name.startswith(prefix))
        if not found:
            raise ValueError(
                f"The keras-hub weights in {weights_file.directory!r} have no "
                f"layers/{prefix}* group."
            )
        return f"layers/{found[0]}/vars/0"

    layout = [
        (backbone.token_embedding.embeddings, single("reversible_embedding")),
        (backbone.final_norm.scale, single("rms_normalization")),
    ]
    for index, block in enumerate(backbone.transformer_layers):
        prefix = f"layers/{blocks[index]}/"
        attention = block.attention
        entries = [
            (block.pre_attention_norm.scale, "pre_attention_norm"),
            (attention.query.kernel, "attention/query_dense"),
            (attention.key.kernel, "attention/key_dense"),
            (attention.value.kernel, "attention/value_dense"),
            (attention.attention_output.kernel, "attention/output_dense"),
            (block.pre_ffw_norm.scale, "pre_ffw_norm"),
            (block.ffw.gate.kernel, "gating_ffw"),
            (block.ffw.up.kernel, "gating_ffw_2"),
            (block.ffw.down.kernel, "ffw_linear"),
        ]
        if attention.use_query_key_norm:
            entries += [
                (attention.query_norm.scale, "attention/query_norm"),
                (attention.key_norm.scale, "attention/key_norm"),
            ]
        if block.post_attention_norm is not None:
            entries.append((block.post_attention_norm.scale, "post_attention_norm"))
        if block.post_ffw_norm is not None:
            entries.append((block.post_ffw_norm.scale, "post_ffw_norm"))
        layout += [(variable, f"{prefix}{name}/vars/0") for variable, name in entries]
    return layout


def load_weights(backbone, directory):
    """Assigns the weights of a keras-hub preset to `backbone`, after checking
    every path and shape."""
    with KerasWeightsFile(directory) as weights_file:
        layout = weight_layout(backbone, weights_file)
        for variable, path in layout:
            shape = weights_file.shape(path)
            if shape != tuple(variable.shape):
                raise ValueError(
                    f"{path} in {directory!r} has shape {shape}; the "
                    f"configuration implies {tuple(variable.shape)}."
                )
        for variable, path in layout:
            assign(variable, weights_file.get(path))


def tokenizer_proto(directory):
    """The SentencePiece model bytes of a keras-hub preset."""
    path = os.path.join(directory, TOKENIZER_ASSET)
    if not os.path.isfile(path):
        raise ValueError(
            f"The keras-hub preset {directory!r} has no {TOKENIZER_ASSET}: it "
            "holds no Gemma tokenizer."
        )
    with open(path, "rb") as file:
        return file.read()


def preprocessor_settings(directory):
    """`sequence_length` (and start/end token flags) from `preprocessor.json`."""
    path = os.path.join(directory, "preprocessor.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        config = json.load(file).get("config", {})
    return {
        key: config[key]
        for key in ("sequence_length", "add_start_token", "add_end_token")
        if config.get(key) is not None
    }
