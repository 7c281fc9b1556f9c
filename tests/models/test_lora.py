"""LoRA adapters: what trains, saving and loading by name, merging, fit."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM

CONFIG = dict(
    vocabulary_size=40,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=24,
    head_dim=8,
    layer_types=["local", "global"],
    sliding_window_size=3,
)
INPUTS = {
    "token_ids": np.array([[2, 7, 9, 11, 13, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 0]]),
}


def _backbone(seed=0, **overrides):
    backbone = GemmaBackbone(**dict(CONFIG, **overrides))
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return backbone


def _randomize_adapters(backbone, seed=1):
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))


def _hidden(backbone):
    return keras.ops.convert_to_numpy(backbone(INPUTS))


def test_only_adapters_train():
    backbone = _backbone()
    backbone.enable_lora(rank=2)
    trainable = {w.path.split("/", 1)[1] for w in backbone.trainable_weights}
    assert trainable == {
        f"decoder_block_{i}/attention/{name}/lora_kernel_{ab}"
        for i in range(2)
        for name in ("query", "value")
        for ab in "ab"
    }
    assert len(backbone.non_trainable_weights) == len(backbone.weights) - 8


def test_all_projections_can_be_adapted():
    backbone = _backbone()
    names = ["query", "key", "value", "attention_output", "gate", "up", "down"]
    backbone.enable_lora(rank=2, target_names=names, alpha=4.0)
    assert len(backbone.trainable_weights) == 2 * 7 * 2
    before = _hidden(backbone)
    _randomize_adapters(backbone)
    assert not np.allclose(before, _hidden(backbone))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": 2, "target_names": ["query", "qkv"]}, "target_names"),
        ({"rank": 2, "alpha": -1}, "alpha"),
    ],
)
def test_bad_lora_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        _backbone().enable_lora(**kwargs)


def test_enable_twice_is_rejected():
    backbone = _backbone()
    backbone.enable_lora(rank=2)
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(rank=2)


def test_adapters_load_by_layer_name_not_position(tmp_path):
    trained = _backbone()
    trained.enable_lora(rank=2, target_names=["query", "value"])
    _randomize_adapters(trained)
    path = tmp_path / "adapters.safetensors"
    trained.save_lora_weights(path)

    # Same base weights; adapters created in the other order, so restoring by
    # position would put query adapters into value projections.
    restored = _backbone()
    restored.enable_lora(rank=2, target_names=["value", "query"])
    assert _hidden(restored).tolist() != _hidden(trained).tolist()
    restored.load_lora_weights(path)
    np.testing.assert_allclose(_hidden(restored), _hidden(trained), atol=1e-6)

    fresh = _backbone()
    fresh.load_lora_weights(path)  # enables LoRA with the saved settings
    assert fresh.lora_settings["rank"] == 2
    np.testing.assert_allclose(_hidden(fresh), _hidden(trained), atol=1e-6)


def test_adapters_from_another_architecture_are_rejected(tmp_path):
    trained = _backbone(num_layers=3, layer_types=["local", "global", "global"])
    trained.enable_lora(rank=2)
    path = tmp_path / "adapters.safetensors"
    trained.save_lora_weights(path)
    other = _backbone()
    with pytest.raises(ValueError, match="decoder_block_2"):
        other.load_lora_weights(path)
    ranked = _backbone()
    ranked.enable_lora(rank=4)
    with pytest.raises(ValueError, match="settings"):
        ranked.load_lora_weights(path)


def test_merge_folds_adapters_into_kernels():
    backbone = _backbone()
    backbone.enable_lora(rank=2, target_names=["query", "value", "down"])
    _randomize_adapters(backbone)
    merged = backbone.merge_lora_weights()
    assert merged.lora_settings is None
    assert not any("lora" in w.path for w in merged.weights)
    np.testing.assert_allclose(_hidden(merged), _hidden(backbone), atol=1e-5)


def test_lora_model_reloads_from_keras_file(tmp_path):
    backbone = _backbone()
    backbone.enable_lora(rank=2)
    _randomize_adapters(backbone)
    lm = GemmaCausalLM(backbone)
    path = str(tmp_path / "lora.keras")
    lm.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(INPUTS)),
        keras.ops.convert_to_numpy(lm(INPUTS)),
        atol=1e-6,
    )
    assert len(restored.trainable_weights) == len(lm.trainable_weights)


def test_lora_fit_lowers_training_loss():
    rng = np.random.default_rng(3)
    token_ids = rng.integers(3, 40, size=(8, 12)).astype("int32")
    inputs = {"token_ids": token_ids[:, :-1], "padding_mask": np.ones((8, 11), "int32")}
    labels = token_ids[:, 1:]
    backbone = _backbone()
    backbone.enable_lora(rank=4, target_names=["query", "value", "gate", "up", "down"])
    lm = GemmaCausalLM(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    frozen = [keras.ops.convert_to_numpy(w) for w in backbone.non_trainable_weights]
    history = lm.fit(inputs, labels, batch_size=4, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    for before, variable in zip(frozen, backbone.non_trainable_weights):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(variable))
