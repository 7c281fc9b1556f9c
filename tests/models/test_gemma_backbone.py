"""GemmaBackbone configuration, validation and serialization."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_gemma import GemmaBackbone, GemmaCausalLM
from tests.transformers_reference import build_reference_model, save_reference_model

TINY = dict(
    vocabulary_size=50,
    num_layers=3,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=24,
    head_dim=8,
    layer_types=["local", "local", "global"],
    sliding_window_size=2,
    query_pre_attn_scalar=12,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_query_key_norm=True,
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
    rope_max_wavelength={"global": 1e6, "local": 1e4},
    rope_scaling_factor={"global": 8.0, "local": 1.0},
)

INPUTS = {
    "token_ids": np.array([[2, 7, 9, 11, 0], [2, 4, 0, 0, 0]]),
    "padding_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
}


def _randomized(model):
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    return model


def test_config_round_trip():
    backbone = GemmaBackbone(**TINY)
    restored = GemmaBackbone.from_config(backbone.get_config())
    assert restored.get_config() == backbone.get_config()
    assert restored.count_params() == backbone.count_params()


def test_keras_file_reloads_in_safe_mode(tmp_path):
    lm = GemmaCausalLM(_randomized(GemmaBackbone(**TINY)))
    expected = keras.ops.convert_to_numpy(lm(INPUTS))
    path = str(tmp_path / "model.keras")
    lm.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(restored.backbone, GemmaBackbone)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(INPUTS)), expected
    )


def test_layer_types_drive_attention_types():
    backbone = GemmaBackbone(**TINY)
    assert [block.attention_type for block in backbone.transformer_layers] == [
        "local",
        "local",
        "global",
    ]
    wavelengths = [
        block.attention.rotary.max_wavelength for block in backbone.transformer_layers
    ]
    assert wavelengths == [1e4, 1e4, 1e6]


def test_local_window_limits_what_a_token_sees():
    """Changing a token outside every local window leaves the output alone."""
    config = dict(TINY, layer_types=["local"] * 3, sliding_window_size=2)
    backbone = _randomized(GemmaBackbone(**config))
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
    mask = np.ones_like(ids)
    changed = ids.copy()
    changed[0, 0] = 20
    first = keras.ops.convert_to_numpy(
        backbone({"token_ids": ids, "padding_mask": mask})
    )
    second = keras.ops.convert_to_numpy(
        backbone({"token_ids": changed, "padding_mask": mask})
    )
    # Three local layers of window 2 reach three tokens back.
    np.testing.assert_array_equal(first[0, 4:], second[0, 4:])
    assert not np.allclose(first[0, 3], second[0, 3])


def test_padding_side_does_not_change_real_tokens():
    backbone = _randomized(GemmaBackbone(**TINY))
    right = backbone(
        {
            "token_ids": np.array([[4, 5, 6, 0, 0]]),
            "padding_mask": np.array([[1, 1, 1, 0, 0]]),
        }
    )
    left = backbone(
        {
            "token_ids": np.array([[0, 0, 4, 5, 6]]),
            "padding_mask": np.array([[0, 0, 1, 1, 1]]),
        }
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(right)[0, :3],
        keras.ops.convert_to_numpy(left)[0, 2:],
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "overrides, argument",
    [
        ({"num_query_heads": 3}, "num_key_value_heads"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_layers": -1}, "num_layers"),
        ({"head_dim": 2.5}, "head_dim"),
        ({"layer_types": ["local", "sliding", "global"]}, r"layer_types\[1\]"),
        ({"layer_types": ["global", "global"]}, "layer_types"),
        ({"sliding_window_size": None}, "sliding_window_size"),
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
        ({"final_logit_soft_cap": -1.0}, "final_logit_soft_cap"),
        ({"rope_max_wavelength": {"global": 1e4}}, "rope_max_wavelength"),
        ({"rope_scaling_factor": 0}, "rope_scaling_factor"),
    ],
)
def test_contradictory_configuration_is_rejected(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        GemmaBackbone(**dict(TINY, **overrides))


def _saved_checkpoint(tmp_path):
    save_reference_model(build_reference_model("gemma"), tmp_path)
    return tmp_path


def test_non_gemma_checkpoint_is_rejected(tmp_path):
    directory = _saved_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GemmaBackbone.from_preset(directory)


def test_missing_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        GemmaBackbone.from_preset(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _saved_checkpoint(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        GemmaBackbone.from_preset(directory)


def test_misshaped_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _saved_checkpoint(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    tensors[key] = np.zeros((3, 3), "float32")
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"self_attn\.k_proj\.weight.*shape"):
        GemmaBackbone.from_preset(directory)


def test_missing_weights_are_reported(tmp_path):
    directory = _saved_checkpoint(tmp_path)
    os.remove(directory / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        GemmaBackbone.from_preset(directory)


# A `None` entry in sys.modules makes Python treat a package as absent, as
# if it were not installed.
_BLOCK_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None
sys.modules["tensorflow_text"] = None
import keras_gemma
assert sys.modules["tensorflow"] is None, "keras_gemma imported tensorflow"
print("ok", keras_gemma.__version__)
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_import_needs_no_tensorflow(backend):
    environment = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_TENSORFLOW],
        env=environment,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
