"""Logits of imported transformers checkpoints equal transformers' own."""

import json
import os

import keras
import numpy as np
import pytest
import torch

from keras_gemma import GemmaCausalLM
from tests.transformers_reference import (
    build_reference_model,
    load_reference_model,
    reference_logits,
    save_reference_model,
)

GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
}

CONFIGURATIONS = {
    "gemma1_multi_query": ("gemma", {}),
    "gemma1_grouped_query": (
        "gemma",
        {
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        },
    ),
    "gemma2_soft_caps_window": (
        "gemma2",
        {
            "num_key_value_heads": 2,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma2_no_soft_caps": (
        "gemma2",
        {
            "sliding_window": 6,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        },
    ),
    "gemma3_qk_norm_rope_scaling": (
        "gemma3_text",
        {
            "num_hidden_layers": 4,
            "sliding_window": 4,
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ],
            "rope_parameters": GEMMA3_ROPE,
            "query_pre_attn_scalar": 40,
        },
    ),
    "gemma3_grouped_query_final_cap": (
        "gemma3_text",
        {
            "num_key_value_heads": 2,
            "sliding_window": 5,
            "final_logit_softcapping": 4.0,
        },
    ),
}


def _batch_with_padding(vocabulary_size, length=11):
    rng = np.random.default_rng(1)
    token_ids = rng.integers(3, vocabulary_size, size=(3, length))
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0
    padding_mask[2, 2:] = 0
    token_ids[padding_mask == 0] = 0
    return token_ids, padding_mask


def _our_logits(lm, token_ids, padding_mask):
    logits = lm({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.ops.convert_to_numpy(logits)


def _assert_logits_match(reference, ours, padding_mask):
    real = padding_mask.astype(bool)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours[real], reference[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_logits_match_transformers(name, tmp_path):
    family, overrides = CONFIGURATIONS[name]
    model = build_reference_model(family, **overrides)
    save_reference_model(model, tmp_path)
    lm = GemmaCausalLM.from_preset(tmp_path)
    token_ids, padding_mask = _batch_with_padding(model.config.vocab_size)
    _assert_logits_match(
        reference_logits(model, token_ids, padding_mask),
        _our_logits(lm, token_ids, padding_mask),
        padding_mask,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_checkpoint(dtype, tmp_path):
    model = build_reference_model("gemma2", sliding_window=4)
    save_reference_model(model, tmp_path, dtype=dtype, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    # The reference runs in float32 on the same rounded weights.
    model = load_reference_model(tmp_path)
    lm = GemmaCausalLM.from_preset(tmp_path)
    token_ids, padding_mask = _batch_with_padding(model.config.vocab_size)
    _assert_logits_match(
        reference_logits(model, token_ids, padding_mask),
        _our_logits(lm, token_ids, padding_mask),
        padding_mask,
    )


def test_multimodal_gemma3_text_part(tmp_path):
    """A `gemma3` directory nests the text config and prefixes its tensors."""
    model = build_reference_model("gemma3_text", sliding_window=4)
    text_dir = tmp_path / "text"
    save_reference_model(model, text_dir)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(text_dir / "model.safetensors")
    renamed = {
        key.replace("model.", "model.language_model.", 1): value
        for key, value in tensors.items()
    }
    renamed["model.vision_tower.stand_in.weight"] = np.zeros((2, 2), "float32")
    multimodal_dir = tmp_path / "multimodal"
    multimodal_dir.mkdir()
    save_file(renamed, multimodal_dir / "model.safetensors")
    text_config = json.loads((text_dir / "config.json").read_text())
    config = {"model_type": "gemma3", "text_config": text_config}
    (multimodal_dir / "config.json").write_text(json.dumps(config))

    lm = GemmaCausalLM.from_preset(multimodal_dir)
    token_ids, padding_mask = _batch_with_padding(model.config.vocab_size)
    _assert_logits_match(
        reference_logits(model, token_ids, padding_mask),
        _our_logits(lm, token_ids, padding_mask),
        padding_mask,
    )


def test_imported_configuration(tmp_path):
    family, overrides = CONFIGURATIONS["gemma3_qk_norm_rope_scaling"]
    save_reference_model(build_reference_model(family, **overrides), tmp_path)
    backbone = GemmaCausalLM.from_preset(tmp_path).backbone
    assert backbone.layer_types == ["local", "global", "local", "local"]
    assert backbone.rope_max_wavelength == {"global": 1e6, "local": 1e4}
    assert backbone.rope_scaling_factor == {"global": 8.0, "local": 1.0}
    assert backbone.query_pre_attn_scalar == 40
    assert backbone.use_query_key_norm
