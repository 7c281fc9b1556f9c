"""Hugging Face transformers checkpoints: configuration and weight layout.

A transformers Gemma directory holds `config.json` and safetensors weights
named like `model.layers.3.self_attn.q_proj.weight`. This module maps that
layout to `GemmaBackbone`'s variables, as data, so import and export share
one table.
"""

import json
import os

import numpy as np

GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")

_ATTENTION_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def read_transformers_config(directory):
    """Returns the text-model part of a transformers `config.json`."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ValueError(
            f"{directory!r} has no config.json: not a transformers checkpoint."
        )
    with open(path) as file:
        config = json.load(file)
    model_type = config.get("model_type")
    if model_type not in GEMMA_MODEL_TYPES:
        raise ValueError(
            f"{path} has model_type {model_type!r}; keras-gemma reads "
            f"{list(GEMMA_MODEL_TYPES)}."
        )
    if model_type == "gemma3":
        text_config = dict(config.get("text_config") or {})
        text_config.setdefault("model_type", "gemma3_text")
        return text_config, "model.language_model."
    return config, "model."


def _rope_settings(config, model_type):
    """Per-attention-type RoPE base and linear scaling from a config.

    transformers 5 writes `rope_parameters` (per layer type for Gemma 3);
    older files carry `rope_theta`, `rope_local_base_freq` and
    `rope_scaling`.
    """
    default_global_base = 1_000_000.0 if model_type == "gemma3_text" else 10_000.0
    bases = {"global": default_global_base, "local": 10_000.0}
    factors = {"global": 1.0, "local": 1.0}
    parameters = config.get("rope_parameters")
    if parameters:
        if "full_attention" in parameters or "sliding_attention" in parameters:
            per_type = {
                _ATTENTION_TYPES[key]: value
                for key, value in parameters.items()
                if key in _ATTENTION_TYPES
            }
        else:
            per_type = {"global": parameters, "local": parameters}
        for attention_type, settings in per_type.items():
            _check_rope_type(settings)
            bases[attention_type] = float(settings.get("rope_theta", 10_000.0))
            if settings.get("rope_type") == "linear":
                factors[attention_type] = float(settings["factor"])
        if model_type != "gemma3_text":
            bases["local"] = bases["global"]
        return bases, factors
    bases["global"] = float(config.get("rope_theta", bases["global"]))
    if model_type == "gemma3_text":
        bases["local"] = float(config.get("rope_local_base_freq", 10_000.0))
    else:
        bases["local"] = bases["global"]
    scaling = config.get("rope_scaling")
    if scaling:
        _check_rope_type(scaling)
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            factors["global"] = float(scaling["factor"])
    return bases, factors


def _check_rope_type(settings):
    rope_type = settings.get("rope_type", settings.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported; Gemma uses 'default' "
            "or 'linear'."
        )


def _layer_types(config, model_type, num_layers):
    names = config.get("layer_types")
    if names:
        unknown = sorted(set(names) - set(_ATTENTION_TYPES))
        if unknown:
            raise ValueError(f"config.json has unknown layer_types {unknown}.")
        return [_ATTENTION_TYPES[name] for name in names]
    if model_type == "gemma2":
        return ["local" if index % 2 == 0 else "global" for index in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = config.get("sliding_window_pattern", 6)
        return [
            "global" if (index + 1) % pattern == 0 else "local"
            for index in range(num_layers)
        ]
    return ["global"] * num_layers


def backbone_config_from_transformers(config):
    """`GemmaBackbone` keyword arguments for a transformers text config."""
    model_type = config.get("model_type", "gemma")
    if config.get("tie_word_embeddings") is False:
        raise ValueError(
            "config.json sets tie_word_embeddings=false; Gemma ties the output "
            "projection to the token embedding."
        )
    num_layers = config["num_hidden_layers"]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    bases, factors = _rope_settings(config, model_type)
    layer_types = _layer_types(config, model_type, num_layers)
    has_post_norms = model_type != "gemma"
    return {
        "vocabulary_size": config["vocab_size"],
        "num_layers": num_layers,
        "num_query_heads": num_heads,
        "num_key_value_heads": config.get("num_key_value_heads", num_heads),
        "hidden_dim": config["hidden_size"],
        "intermediate_dim": config["intermediate_size"],
        "head_dim": head_dim,
        "layer_types": layer_types,
        "sliding_window_size": (
            config.get("sliding_window") if "local" in layer_types else None
        ),
        "query_pre_attn_scalar": config.get("query_pre_attn_scalar") or head_dim,
        # transformers' Gemma 3 keeps `attn_logit_softcapping` in its config
        # but never applies it; so neither do we.
        "attention_logit_soft_cap": (
            None
            if model_type == "gemma3_text"
            else config.get("attn_logit_softcapping")
        ),
        "final_logit_soft_cap": config.get("final_logit_softcapping"),
        "use_query_key_norm": model_type == "gemma3_text",
        "use_post_attention_norm": has_post_norms,
        "use_post_ffw_norm": has_post_norms,
        "rope_max_wavelength": bases,
        "rope_scaling_factor": factors,
        "layer_norm_epsilon": config.get("rms_norm_eps", 1e-6),
    }


# Each transform is (to ours given our variable's shape, back to transformers,
# the transformers shape for our variable's shape).
def _heads_in(tensor, shape):
    heads, hidden, head_dim = shape
    return tensor.reshape(heads, head_dim, hidden).transpose(0, 2, 1)


def _heads_in_inverse(array):
    heads, hidden, head_dim = array.shape
    return array.transpose(0, 2, 1).reshape(heads * head_dim, hidden)


def _heads_out(tensor, shape):
    heads, head_dim, hidden = shape
    return tensor.T.reshape(heads, head_dim, hidden)


def _heads_out_inverse(array):
    heads, head_dim, hidden = array.shape
    return array.reshape(heads * head_dim, hidden).T


TRANSFORMS = {
    "identity": (lambda tensor, shape: tensor, lambda array: array, tuple),
    "transpose": (
        lambda tensor, shape: tensor.T,
        lambda array: array.T,
        lambda shape: tuple(reversed(shape)),
    ),
    "heads_in": (
        _heads_in,
        _heads_in_inverse,
        lambda shape: (shape[0] * shape[2], shape[1]),
    ),
    "heads_out": (
        _heads_out,
        _heads_out_inverse,
        lambda shape: (shape[2], shape[0] * shape[1]),
    ),
}


def weight_layout(backbone, prefix="model."):
    """`(variable, transformers_key, transform_name)` for every weight."""
    entries = [
        (backbone.token_embedding.embeddings, "embed_tokens.weight", "identity"),
        (backbone.final_norm.scale, "norm.weight", "identity"),
    ]
    for index, block in enumerate(backbone.transformer_layers):
        entries += [
            (variable, f"layers.{index}.{key}", transform)
            for variable, key, transform in _block_layout(block)
        ]
    return [(variable, prefix + key, transform) for variable, key, transform in entries]


def _block_layout(block):
    attention = block.attention
    entries = [
        (block.pre_attention_norm, "input_layernorm"),
        (attention.query, "self_attn.q_proj", "heads_in"),
        (attention.key, "self_attn.k_proj", "heads_in"),
        (attention.value, "self_attn.v_proj", "heads_in"),
        (attention.attention_output, "self_attn.o_proj", "heads_out"),
        (block.ffw.gate, "mlp.gate_proj", "transpose"),
        (block.ffw.up, "mlp.up_proj", "transpose"),
        (block.ffw.down, "mlp.down_proj", "transpose"),
    ]
    if attention.use_query_key_norm:
        entries += [
            (attention.query_norm, "self_attn.q_norm"),
            (attention.key_norm, "self_attn.k_norm"),
        ]
    if block.post_attention_norm is not None:
        entries += [
            (block.post_attention_norm, "post_attention_layernorm"),
            (block.pre_ffw_norm, "pre_feedforward_layernorm"),
        ]
    else:
        # Gemma 1 names its pre-feed-forward norm "post_attention_layernorm".
        entries.append((block.pre_ffw_norm, "post_attention_layernorm"))
    if block.post_ffw_norm is not None:
        entries.append((block.post_ffw_norm, "post_feedforward_layernorm"))
    layout = []
    for layer, name, *transform in entries:
        if transform:
            layout.append((layer.kernel, f"{name}.weight", transform[0]))
        else:
            layout.append((layer.scale, f"{name}.weight", "identity"))
    return layout


def transformers_shape(variable, transform):
    """The shape transformers stores `variable` with."""
    return TRANSFORMS[transform][2](tuple(variable.shape))


def to_variable_layout(tensor, variable, transform):
    """Converts one transformers tensor to the shape of `variable`: a view
    where possible. Left strided, a transposed kernel is already in the
    memory order PyTorch stores it in (see `storage_layout`), so loading
    does not transpose it twice; other backends copy it as they load it."""
    return TRANSFORMS[transform][0](tensor, tuple(variable.shape))


def to_transformers_layout(array, transform):
    """Converts one of our variable values to the transformers layout."""
    return np.ascontiguousarray(TRANSFORMS[transform][1](array))


# -- export ---------------------------------------------------------------

_EXPORT_CLASSES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _export_model_type(backbone):
    """The transformers `model_type` that represents `backbone` exactly."""
    post_attention = backbone.use_post_attention_norm
    post_ffw = backbone.use_post_ffw_norm
    if backbone.use_query_key_norm:
        if not (post_attention and post_ffw):
            raise ValueError(
                "transformers has no Gemma with QK-norm but without both "
                "post-norms: this backbone cannot be exported (Gemma 3 has "
                "`use_query_key_norm`, `use_post_attention_norm` and "
                "`use_post_ffw_norm` all True)."
            )
        return "gemma3_text"
    if post_attention and post_ffw:
        return "gemma2"
    if post_attention or post_ffw:
        raise ValueError(
            "transformers' Gemma models have both post-norms (Gemma 2, 3) or "
            "neither (Gemma 1); this backbone has only one and cannot be exported."
        )
    unsupported = []
    if "local" in backbone.layer_types:
        unsupported.append("local (sliding-window) layers")
    if backbone.attention_logit_soft_cap or backbone.final_logit_soft_cap:
        unsupported.append("soft-caps")
    if backbone.query_pre_attn_scalar != backbone.head_dim:
        unsupported.append("`query_pre_attn_scalar` other than `head_dim`")
    if unsupported:
        raise ValueError(
            "A backbone without post-norms exports as transformers' Gemma 1, which "
            f"has no {', '.join(unsupported)}: this configuration cannot be exported."
        )
    return "gemma"


def _rope_entry(base, factor):
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": float(base)}
    return {"rope_type": "linear", "factor": float(factor), "rope_theta": float(base)}


def transformers_config_from_backbone(backbone, special_token_ids=None):
    """A transformers `config.json` dict describing `backbone` exactly.

    Gemma 1 configurations become `gemma`, those with post-norms `gemma2`,
    those with QK-norm `gemma3_text`; key/value heads, sliding windows, the
    per-layer attention types, soft-caps, the query scaling and RoPE settings
    are all kept. A configuration transformers cannot express raises
    `ValueError`.

    Args:
        backbone: a `GemmaBackbone`.
        special_token_ids: `{"pad": id, "eos": id, "bos": id}`; Gemma's
            0, 1, 2 by default.

    Example:

    >>> from keras_gemma import GemmaBackbone
    >>> backbone = GemmaBackbone(vocabulary_size=64, num_layers=2,
    ...     num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, head_dim=8, layer_types=["local", "global"],
    ...     sliding_window_size=4, attention_logit_soft_cap=50.0,
    ...     use_post_attention_norm=True, use_post_ffw_norm=True)
    >>> config = transformers_config_from_backbone(backbone)
    >>> config["model_type"], config["num_key_value_heads"], config["layer_types"]
    ('gemma2', 2, ['sliding_attention', 'full_attention'])
    """
    import keras

    model_type = _export_model_type(backbone)
    ids = {"pad": 0, "eos": 1, "bos": 2}
    ids.update({k: v for k, v in (special_token_ids or {}).items() if v is not None})
    used_types = set(backbone.layer_types)
    bases = backbone.rope_max_wavelength
    factors = backbone.rope_scaling_factor
    config = {
        "architectures": [_EXPORT_CLASSES[model_type]],
        "model_type": model_type,
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "pad_token_id": ids["pad"],
        "eos_token_id": ids["eos"],
        "bos_token_id": ids["bos"],
        "dtype": keras.backend.standardize_dtype(backbone.variable_dtype),
    }
    if model_type == "gemma3_text":
        if backbone.attention_logit_soft_cap:
            raise ValueError(
                "transformers' Gemma 3 does not apply an attention soft-cap (it "
                "ignores `attn_logit_softcapping`), so a backbone with QK-norm "
                "and `attention_logit_soft_cap` cannot be exported exactly."
            )
        config["rope_parameters"] = {
            "sliding_attention": _rope_entry(bases["local"], factors["local"]),
            "full_attention": _rope_entry(bases["global"], factors["global"]),
        }
        config["max_position_embeddings"] = 131072
        config["use_bidirectional_attention"] = False
    else:
        settings = {(bases[kind], factors[kind]) for kind in used_types}
        if len(settings) > 1:
            raise ValueError(
                f"transformers' {model_type} uses one RoPE setting for all layers, "
                f"but this backbone's local and global layers differ "
                f"(bases {bases}, scaling {factors}): it cannot be exported."
            )
        base, factor = settings.pop()
        config["rope_parameters"] = _rope_entry(base, factor)
        config["max_position_embeddings"] = 8192
    if model_type == "gemma":
        config["hidden_act"] = "gelu_pytorch_tanh"
    else:
        config.update(
            {
                "query_pre_attn_scalar": backbone.query_pre_attn_scalar,
                "sliding_window": backbone.sliding_window_size or 4096,
                "layer_types": [
                    "sliding_attention" if kind == "local" else "full_attention"
                    for kind in backbone.layer_types
                ],
                "attn_logit_softcapping": backbone.attention_logit_soft_cap,
                "final_logit_softcapping": backbone.final_logit_soft_cap,
            }
        )
    return config
