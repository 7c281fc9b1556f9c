"""Keras presets in the keras-hub format (what Kaggle serves) load exactly."""

import h5py
import pytest
import torch

from keras_gemma import GemmaCausalLM
from keras_gemma.checkpoints import keras_hub_format, preset_loading, sources
from tests.checkpoints.helpers import assert_close, batch, logits, tiny_proto
from tests.checkpoints.keras_hub_fixture import write_keras_hub_preset
from tests.transformers_reference import (
    build_reference_model,
    reference_logits,
)

CASES = {
    "gemma_grouped_query": ("gemma", {"num_key_value_heads": 2, "head_dim": 8}),
    # query_head_dim_normalize=False: queries scaled by hidden / heads (8),
    # not head_dim (16), as Gemma 2 27B does.
    "gemma2_hidden_over_heads_scaling": (
        "gemma2",
        {
            "num_key_value_heads": 2,
            "sliding_window": 4,
            "query_pre_attn_scalar": 8,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3_pattern_and_rope_scaling": (
        "gemma3_text",
        {
            "num_hidden_layers": 7,
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
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


def _reference(name):
    family, overrides = CASES[name]
    from tests.checkpoints.helpers import tiny_vocabulary_size

    return build_reference_model(
        family, vocab_size=tiny_vocabulary_size(), **overrides
    ), family.replace("_text", "")


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_hub_preset_matches_transformers(name, tmp_path):
    model, family = _reference(name)
    write_keras_hub_preset(tmp_path, model, family, tiny_proto())
    assert sources.resolve(tmp_path).format == "keras_hub"

    lm = GemmaCausalLM.from_preset(tmp_path)
    token_ids, padding_mask = batch(model.config.vocab_size, length=11)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )
    assert lm.preprocessor.sequence_length == 64  # from preprocessor.json
    assert lm.preprocessor.tokenizer.proto == tiny_proto()


def test_weights_file_has_keras_hub_group_names(tmp_path):
    """The h5 layout the loader relies on, as Keras writes it for keras-hub's
    class and attribute names."""
    model, family = _reference("gemma_grouped_query")
    write_keras_hub_preset(tmp_path, model, family, tiny_proto())
    with h5py.File(tmp_path / "model.weights.h5", "r") as file:
        for path in (
            "layers/reversible_embedding/vars/0",
            "layers/gemma_decoder_block/pre_attention_norm/vars/0",
            "layers/gemma_decoder_block_1/attention/query_dense/vars/0",
            "layers/gemma_decoder_block_2/attention/output_dense/vars/0",
            "layers/gemma_decoder_block_2/gating_ffw_2/vars/0",
            "layers/gemma_decoder_block_2/ffw_linear/vars/0",
            "layers/rms_normalization/vars/0",
        ):
            assert path in file, path
        assert file[
            "layers/gemma_decoder_block_1/attention/query_dense/vars/0"
        ].shape == (
            4,
            32,
            8,
        )


def test_sharded_bfloat16_keras_hub_weights(tmp_path):
    model, family = _reference("gemma2_hidden_over_heads_scaling")
    write_keras_hub_preset(
        tmp_path, model, family, tiny_proto(), dtype="bfloat16", max_shard_size=0.00005
    )
    assert (tmp_path / "model.weights.json").exists()
    assert len(list(tmp_path.glob("model_*.weights.h5"))) > 1
    # The reference runs on the same bfloat16-rounded weights, in float32.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    lm = preset_loading.load_causal_lm(tmp_path, dtype="float32")
    token_ids, padding_mask = batch(model.config.vocab_size)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )


def test_configuration_mapping():
    config = keras_hub_format.backbone_config_from_keras_hub(
        "GemmaBackbone",
        {
            "vocabulary_size": 256000,
            "num_layers": 46,
            "num_query_heads": 32,
            "num_key_value_heads": 16,
            "hidden_dim": 4608,
            "intermediate_dim": 73728,
            "head_dim": 128,
            "query_head_dim_normalize": False,
            "use_post_ffw_norm": True,
            "use_post_attention_norm": True,
            "final_logit_soft_cap": 30.0,
            "attention_logit_soft_cap": 50.0,
            "use_sliding_window_attention": True,
            "sliding_window_size": 4096,
        },
    )
    assert config["intermediate_dim"] == 36864
    assert config["query_pre_attn_scalar"] == 144
    assert config["layer_types"][:4] == ["local", "global", "local", "global"]
    assert config["sliding_window_size"] == 4096
    with pytest.raises(ValueError, match="keras-gemma reads"):
        keras_hub_format.read_config(_write_config({"registered_name": "keras_hub>X"}))


def _write_config(content):
    import json
    import tempfile

    directory = tempfile.mkdtemp()
    with open(f"{directory}/config.json", "w") as file:
        json.dump({"class_name": "PaliGemmaBackbone", "config": {}, **content}, file)
    return directory


def test_missing_weights_group_is_reported(tmp_path):
    model, family = _reference("gemma_grouped_query")
    write_keras_hub_preset(tmp_path, model, family, tiny_proto())
    with h5py.File(tmp_path / "model.weights.h5", "a") as file:
        del file["layers/gemma_decoder_block_2/ffw_linear"]
    with pytest.raises(ValueError, match="ffw_linear"):
        preset_loading.load_backbone(tmp_path)
