"""LoRA adapters: what trains, saving and loading by name, merging, fit."""

import keras
import numpy as np
import pytest

from keras_gemma import GemmaCausalLM
from tests.tiny_configs import tiny_backbone, tiny_config

INPUTS = {
    "token_ids": np.array([[2, 7, 9, 11, 13, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 0]]),
}


def _backbone(seed=0, **overrides):
    return tiny_backbone(seed=seed, **overrides)


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
        ({"rank": -2}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 2, "target_names": ["query", "qkv"]}, "target_names"),
        ({"rank": 2, "target_names": "query"}, "target_names"),
        ({"rank": 2, "target_names": []}, "target_names"),
        ({"rank": 2, "target_names": ["query", "value", "query"]}, "target_names"),
        ({"rank": 2, "alpha": -1}, "alpha"),
        ({"rank": 2, "alpha": "2"}, "alpha"),
    ],
)
def test_bad_lora_arguments_leave_the_backbone_unchanged(kwargs, argument):
    backbone = _backbone()
    trainable = len(backbone.trainable_weights)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        backbone.enable_lora(**kwargs)
    # Checked before anything changes: nothing frozen, no adapter added, and
    # a correct call still works.
    assert backbone.lora_settings is None
    assert len(backbone.trainable_weights) == trainable == len(backbone.weights)
    assert not any("lora" in w.path for w in backbone.weights)
    backbone.enable_lora(rank=2)
    assert len(backbone.trainable_weights) == 2 * 2 * 2


def test_rank_may_be_a_numpy_integer():
    backbone = _backbone()
    backbone.enable_lora(rank=np.int64(3))
    assert backbone.lora_settings["rank"] == 3
    assert type(backbone.lora_settings["rank"]) is int  # JSON-serializable
    kernel = backbone.transformer_layers[0].attention.query.lora_kernel_a
    assert kernel.shape[-1] == 3


def test_enable_twice_is_rejected():
    backbone = _backbone()
    backbone.enable_lora(rank=2)
    adapters = [w.path for w in backbone.trainable_weights]
    with pytest.raises(ValueError, match="already enabled.*`enable_lora` once"):
        backbone.enable_lora(rank=4, target_names=["gate"])
    assert backbone.lora_settings["rank"] == 2
    assert [w.path for w in backbone.trainable_weights] == adapters


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
    trained = _backbone(num_layers=3)
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
    vocabulary_size = tiny_config()["vocabulary_size"]
    token_ids = rng.integers(3, vocabulary_size, size=(8, 12)).astype("int32")
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
