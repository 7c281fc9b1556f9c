"""keras-gemma's own preset format: round trips, sharding, atomic saves."""

import json
import os

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from keras_gemma.checkpoints import keras_gemma_format, preset_loading
from tests.checkpoints.helpers import (
    batch,
    logits,
    random_backbone,
    tiny_causal_lm,
    tiny_tokenizer,
)


def test_causal_lm_round_trip_gives_identical_outputs(tmp_path):
    lm = tiny_causal_lm(sequence_length=20, instruction_tuned=True)
    lm.save_to_preset(tmp_path / "preset")
    assert sorted(os.listdir(tmp_path / "preset")) == [
        "config.json",
        "model.safetensors",
        "preprocessor.json",
        "tokenizer.model",
    ]
    reloaded = GemmaCausalLM.from_preset(tmp_path / "preset")

    token_ids, padding_mask = batch(lm.backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask), logits(lm, token_ids, padding_mask)
    )
    assert keras_gemma_format.architecture_config(reloaded.backbone) == (
        keras_gemma_format.architecture_config(lm.backbone)
    )
    assert reloaded.preprocessor.sequence_length == 20
    assert reloaded.instruction_tuned
    text = "Hello world, <start_of_turn>user\nhi"
    assert reloaded.preprocessor.tokenizer.tokenize(text) == (
        lm.preprocessor.tokenizer.tokenize(text)
    )
    config = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert config["format"] == "keras-gemma"
    assert config["weights"]["parameter_count"] == lm.backbone.count_params()


def test_sharded_weights(tmp_path):
    backbone = random_backbone()
    backbone.save_to_preset(tmp_path / "preset", max_shard_size="20KB")
    names = sorted(os.listdir(tmp_path / "preset"))
    shards = [name for name in names if name.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in names
    index = json.loads(
        (tmp_path / "preset" / "model.safetensors.index.json").read_text()
    )
    assert set(index["weight_map"]) == {
        keras_gemma_format.variable_key(variable) for variable in backbone.weights
    }
    for shard in shards:
        tensors = [key for key, name in index["weight_map"].items() if name == shard]
        # A shard exceeds the limit only to hold a single larger tensor.
        size = (tmp_path / "preset" / shard).stat().st_size
        assert size < 20_000 + 4096 or len(tensors) == 1
    reloaded = GemmaBackbone.from_preset(tmp_path / "preset")
    token_ids, padding_mask = batch(backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask),
        logits(backbone, token_ids, padding_mask),
    )


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    backbone = random_backbone(dtype="bfloat16")
    preset_loading.save_to_preset(backbone, tmp_path / "preset")
    header_size = int.from_bytes(
        (tmp_path / "preset" / "model.safetensors").read_bytes()[:8], "little"
    )
    header = json.loads(
        (tmp_path / "preset" / "model.safetensors").read_bytes()[8 : 8 + header_size]
    )
    assert {
        entry["dtype"] for key, entry in header.items() if key != "__metadata__"
    } == {"BF16"}
    reloaded = preset_loading.load_backbone(tmp_path / "preset", dtype="bfloat16")
    for original, loaded in zip(backbone.weights, reloaded.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(keras.ops.cast(loaded, "float32")),
            keras.ops.convert_to_numpy(keras.ops.cast(original, "float32")),
        )


def test_crash_mid_save_leaves_earlier_preset_intact(tmp_path, monkeypatch):
    target = tmp_path / "preset"
    first = tiny_causal_lm(seed=0)
    preset_loading.save_to_preset(first, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    second = tiny_causal_lm(seed=1)
    original_write = keras_gemma_format.write_safetensors

    def write_then_crash(directory, entries, **kwargs):
        original_write(directory, entries[:3], **kwargs)
        raise KeyboardInterrupt("simulated crash while writing weights")

    monkeypatch.setattr(keras_gemma_format, "write_safetensors", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        preset_loading.save_to_preset(second, target)
    monkeypatch.undo()

    after = {name: (target / name).read_bytes() for name in os.listdir(target)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["preset"]  # no staging left behind
    reloaded = GemmaCausalLM.from_preset(target)
    token_ids, padding_mask = batch(first.backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask),
        logits(first, token_ids, padding_mask),
    )


def test_staging_left_by_a_killed_process_does_not_matter(tmp_path):
    """A process killed mid-save leaves a hidden staging directory beside the
    preset; the preset itself loads and a later save succeeds."""
    target = tmp_path / "preset"
    lm = tiny_causal_lm(seed=0)
    preset_loading.save_to_preset(lm, target)
    stale = tmp_path / ".preset.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    preset_loading.save_to_preset(tiny_causal_lm(seed=2), target)
    reloaded = GemmaCausalLM.from_preset(target)
    token_ids, padding_mask = batch(lm.backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask),
        logits(tiny_causal_lm(seed=2), token_ids, padding_mask),
    )


def test_backbone_save_keeps_tokenizer_and_tokenizer_save_keeps_weights(tmp_path):
    target = tmp_path / "preset"
    lm = tiny_causal_lm(seed=0, sequence_length=12)
    preset_loading.save_to_preset(lm, target)
    new_backbone = random_backbone(seed=5)
    preset_loading.save_to_preset(new_backbone, target)
    reloaded = preset_loading.load_causal_lm(target)
    assert reloaded.preprocessor is not None
    assert reloaded.preprocessor.sequence_length == 12
    token_ids, padding_mask = batch(new_backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask),
        logits(new_backbone, token_ids, padding_mask),
    )

    spm_file = tmp_path / "vocabulary.spm"
    spm_file.write_bytes(tiny_tokenizer().proto)
    assert preset_loading.load_tokenizer(spm_file).proto == tiny_tokenizer().proto

    tokenizer_only = tmp_path / "tokenizer_only"
    preset_loading.save_to_preset(tiny_tokenizer(), tokenizer_only)
    assert preset_loading.load_tokenizer(tokenizer_only).vocabulary_size() == (
        tiny_tokenizer().vocabulary_size()
    )
    with pytest.raises(ValueError, match="holds no backbone"):
        preset_loading.load_backbone(tokenizer_only)
    preset_loading.save_to_preset(new_backbone, tokenizer_only)
    assert preset_loading.load_causal_lm(tokenizer_only).preprocessor is not None


def test_backbone_only_preset_loads_without_preprocessor(tmp_path):
    preset_loading.save_to_preset(random_backbone(), tmp_path / "preset")
    assert preset_loading.load_causal_lm(tmp_path / "preset").preprocessor is None
    with pytest.raises(ValueError, match="no tokenizer.model"):
        preset_loading.load_tokenizer(tmp_path / "preset")


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a keras-gemma preset"):
        preset_loading.save_to_preset(random_backbone(), foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_mismatched_weights_are_reported(tmp_path):
    preset_loading.save_to_preset(random_backbone(), tmp_path / "preset")
    config_path = tmp_path / "preset" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["hidden_dim"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        preset_loading.load_backbone(tmp_path / "preset")


def test_loaded_variables_are_fully_initialized(tmp_path):
    """Loading skips random initialization; nothing is left pending, so a
    later stateless scope (as in training) does not re-initialize them."""
    backbone = random_backbone()
    preset_loading.save_to_preset(backbone, tmp_path / "preset")
    reloaded = preset_loading.load_backbone(tmp_path / "preset")
    with keras.StatelessScope():
        pass
    token_ids, padding_mask = batch(backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask),
        logits(backbone, token_ids, padding_mask),
    )
    assert all(variable.trainable for variable in reloaded.weights)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_preset_reloads_quantized_with_identical_outputs(tmp_path, mode):
    lm = tiny_causal_lm(sequence_length=12)
    lm.quantize(mode)
    lm.save_to_preset(tmp_path / "preset")
    pending_before = _pending_variable_count()
    reloaded = GemmaCausalLM.from_preset(tmp_path / "preset")
    # The float (and, for int8, EinsumDense-layout) kernels that quantizing
    # at construction replaced are not left for Keras to initialize later.
    assert _pending_variable_count() == pending_before

    assert reloaded.backbone.get_config()["quantization"] == mode
    kernel = reloaded.backbone.transformer_layers[0].attention.query._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
    token_ids, padding_mask = batch(lm.backbone.vocabulary_size)
    np.testing.assert_array_equal(
        logits(reloaded, token_ids, padding_mask), logits(lm, token_ids, padding_mask)
    )


def _pending_variable_count():
    from keras.src.backend.common import global_state

    return len(global_state.get_global_attribute("uninitialized_variables") or [])
