"""Sharding with keras.distribution on 8 simulated JAX CPU devices."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from keras_gemma import GemmaBackbone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent(
    """
    import keras
    import numpy as np
    from keras_gemma import GemmaBackbone, GemmaCausalLM

    assert len(keras.distribution.list_devices()) == 8
    CONFIG = dict(vocabulary_size=64, num_layers=2, num_query_heads=4,
                  num_key_value_heads=1, hidden_dim=32, intermediate_dim=48,
                  head_dim=8, layer_types=["local", "global"],
                  sliding_window_size=3)
    rng = np.random.default_rng(0)
    reference = GemmaCausalLM(GemmaBackbone(**CONFIG))
    values = [rng.normal(0, 0.3, w.shape).astype("float32")
              for w in reference.weights]
    for variable, value in zip(reference.weights, values):
        variable.assign(value)
    inputs = {"token_ids": rng.integers(3, 64, (4, 7)).astype("int32"),
              "padding_mask": np.ones((4, 7), "int32")}
    expected = keras.ops.convert_to_numpy(reference(inputs))

    mesh = keras.distribution.DeviceMesh(
        (2, 4), ["batch", "model"], keras.distribution.list_devices())
    layout_map = reference.backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map,
                                         batch_dim_name="batch"))
    sharded = GemmaCausalLM(GemmaBackbone(**CONFIG))
    for variable, value in zip(sharded.weights, values):
        variable.assign(value)
    block = sharded.backbone.transformer_layers[0]
    specs = {
        "embedding": sharded.backbone.token_embedding.embeddings,
        "query": block.attention.query.kernel,
        "key": block.attention.key.kernel,
        "gate": block.ffw.gate.kernel,
    }
    specs = {k: tuple(v.value.sharding.spec) for k, v in specs.items()}
    assert specs["embedding"][0] == "model", specs
    assert specs["query"][0] == "model", specs
    # One key/value head cannot be split four ways: the hidden axis is.
    assert specs["key"][:2] == (None, "model"), specs
    assert specs["gate"][1] == "model", specs
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sharded(inputs)), expected, atol=1e-5)

    sharded.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    history = sharded.fit(inputs, labels, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][1] < history.history["loss"][0]

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    data_parallel = GemmaCausalLM(GemmaBackbone(**CONFIG))
    data_parallel.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    eight = {key: np.concatenate([value, value]) for key, value in inputs.items()}
    data_parallel.fit(
        eight, np.concatenate([labels, labels]), batch_size=8, epochs=1, verbose=0
    )
    print("sharded ok")
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="sharding over simulated devices is tested on the JAX backend",
)
def test_model_parallel_matches_unsharded():
    environment = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=environment,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


def test_mesh_without_named_axes_is_rejected():
    backbone = GemmaBackbone(
        vocabulary_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=8,
        head_dim=4,
    )
    devices = ["cpu:0"]
    mesh = keras.distribution.DeviceMesh((1,), ["data"], devices)
    with pytest.raises(ValueError, match="model_parallel_dim_name"):
        backbone.get_layout_map(mesh)
    mesh = keras.distribution.DeviceMesh((1, 1), ["data", "model"], devices)
    with pytest.raises(ValueError, match="data_parallel_dim_name"):
        backbone.get_layout_map(mesh)
    layout_map = backbone.get_layout_map(mesh, data_parallel_dim_name="data")
    down = layout_map["backbone/decoder_block_0/ffw/down/kernel"]
    assert tuple(down.axes) == ("model", None)
