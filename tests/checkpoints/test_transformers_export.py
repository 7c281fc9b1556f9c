"""`export_to_transformers`: transformers loads the export and computes the
same logits, for Gemma 1, 2 and 3 with grouped-query attention, soft-caps and
sliding windows; the exported config keeps every setting."""

import json

import numpy as np
import pytest
import transformers

from keras_gemma import GemmaCausalLM
from keras_gemma.checkpoints import preset_loading
from tests.checkpoints.helpers import (
    assert_close,
    batch,
    logits,
    random_backbone,
    tiny_causal_lm,
)
from tests.transformers_reference import (
    build_reference_model,
    load_reference_model,
    reference_logits,
    save_reference_model,
)

CASES = {
    "gemma1_grouped_query": (
        "gemma",
        {
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        },
    ),
    "gemma2_soft_caps_window_scaling": (
        "gemma2",
        {
            "num_key_value_heads": 2,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3_window_pattern_rope_scaling": (
        "gemma3_text",
        {
            "num_hidden_layers": 4,
            "num_key_value_heads": 2,
            "sliding_window": 3,
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ],
            "query_pre_attn_scalar": 40,
            "final_logit_softcapping": 4.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "linear",
                    "factor": 8.0,
                    "rope_theta": 1_000_000.0,
                },
            },
        },
    ),
}

KEPT_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_parameters",
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_round_trip_through_transformers(name, tmp_path):
    family, overrides = CASES[name]
    original = build_reference_model(family, **overrides)
    save_reference_model(original, tmp_path / "original")
    lm = GemmaCausalLM.from_preset(tmp_path / "original")

    lm.export_to_transformers(tmp_path / "exported")
    exported = load_reference_model(tmp_path / "exported")
    assert type(exported) is type(original)

    token_ids, padding_mask = batch(original.config.vocab_size, length=11)
    assert_close(
        reference_logits(original, token_ids, padding_mask),
        reference_logits(exported, token_ids, padding_mask),
        padding_mask,
    )
    assert_close(
        reference_logits(exported, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )
    original_config = original.config.to_dict()
    exported_config = exported.config.to_dict()
    for key in KEPT_KEYS:
        if key in original_config:
            assert exported_config[key] == original_config[key], key


def test_exported_config_keeps_gemma2_and_3_settings(tmp_path):
    backbone = random_backbone(
        num_query_heads=4,
        num_key_value_heads=1,
        layer_types=["local", "local", "global"],
        sliding_window_size=5,
        query_pre_attn_scalar=12,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=9.0,
        use_query_key_norm=True,
        rope_max_wavelength={"global": 1e6, "local": 1e4},
        rope_scaling_factor={"global": 4.0, "local": 1.0},
    )
    backbone.export_to_transformers(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["num_key_value_heads"] == 1
    assert config["sliding_window"] == 5
    assert config["layer_types"] == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert config["query_pre_attn_scalar"] == 12
    assert config["attn_logit_softcapping"] is None
    assert config["final_logit_softcapping"] == 9.0
    assert config["rope_parameters"]["full_attention"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "rope_theta": 1e6,
    }
    model = load_reference_model(tmp_path)
    token_ids, padding_mask = batch(backbone.vocabulary_size)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(backbone, token_ids, padding_mask),
        padding_mask,
    )


def test_export_with_tokenizer_and_sharding(tmp_path):
    lm = tiny_causal_lm()
    preset_loading.export_to_transformers(lm, tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "tokenizer.model").read_bytes() == (
        lm.preprocessor.tokenizer.proto
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, how are you?"
    assert tokenizer(text)["input_ids"] == [2] + lm.preprocessor.tokenizer.tokenize(
        text
    )
    model = load_reference_model(tmp_path)
    token_ids, padding_mask = batch(lm.backbone.vocabulary_size)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )
    # And back: the export loads as a keras-gemma preset with its tokenizer.
    again = GemmaCausalLM.from_preset(tmp_path)
    np.testing.assert_allclose(
        logits(again, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_post_ffw_norm": False}, "only one"),
        (
            {
                "use_post_attention_norm": False,
                "use_post_ffw_norm": False,
            },
            "local",
        ),
        ({"rope_max_wavelength": {"global": 1e6, "local": 1e4}}, "RoPE"),
        ({"use_query_key_norm": True}, "soft-cap"),
    ],
)
def test_configurations_transformers_cannot_express_are_refused(
    overrides, message, tmp_path
):
    backbone = random_backbone(**overrides)
    with pytest.raises(ValueError, match=message):
        preset_loading.export_to_transformers(backbone, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a transformers checkpoint"):
        preset_loading.export_to_transformers(random_backbone(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep"
