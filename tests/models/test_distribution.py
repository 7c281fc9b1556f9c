"""Sharding with keras.distribution on 8 simulated JAX CPU devices."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from keras_gemma import GemmaBackbone
from tests.tiny_configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Four query heads (split over a 4-way model axis) and one key/value head
# (fewer than the devices on the model axis: split over the hidden axis).
MULTI_QUERY = dict(num_query_heads=4, num_key_value_heads=1, head_dim=8)

_FORWARD_AND_FIT_SCRIPT = textwrap.dedent(
    """
    import keras
    import numpy as np
    from keras_gemma import GemmaBackbone, GemmaCausalLM
    from tests.models.test_distribution import MULTI_QUERY
    from tests.tiny_configs import tiny_config

    assert len(keras.distribution.list_devices()) == 8
    CONFIG = tiny_config("gemma3", **MULTI_QUERY)
    rng = np.random.default_rng(0)
    reference = GemmaCausalLM(GemmaBackbone(**CONFIG))
    values = [rng.normal(0, 0.3, w.shape).astype("float32")
              for w in reference.weights]
    for variable, value in zip(reference.weights, values):
        variable.assign(value)
    vocabulary_size = CONFIG["vocabulary_size"]
    inputs = {"token_ids": rng.integers(3, vocabulary_size, (4, 7)).astype("int32"),
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

_GENERATE_SCRIPT = textwrap.dedent(
    """
    import keras
    import numpy as np
    from keras_gemma import GemmaBackbone, GemmaCausalLM
    from tests.models.test_distribution import MULTI_QUERY
    from tests.tiny_configs import randomize_weights, tiny_config

    devices = keras.distribution.list_devices()
    assert len(devices) == 8
    # Right-padded prompts of unequal lengths; a batch of 3 does not divide
    # the 2-way batch axis.
    PROMPTS = {
        "token_ids": np.array(
            [[2, 7, 9, 11, 5, 30], [2, 5, 0, 0, 0, 0], [2, 40, 17, 3, 0, 0]],
            "int32"),
        "padding_mask": np.array(
            [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], bool),
    }
    NEW_TOKENS = 10
    CASES = [
        # name, config overrides, mesh shape, also stream and beam search
        ("multi-query on 2x4", MULTI_QUERY, (2, 4), True),
        ("multi-query on 1x8", MULTI_QUERY, (1, 8), False),
        ("grouped-query on 1x8",
         dict(num_query_heads=8, num_key_value_heads=2, head_dim=4), (1, 8), False),
    ]

    def greedy(lm, **kwargs):
        return lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS,
                           stop_token_ids=None, **kwargs)

    for name, overrides, shape, everything in CASES:
        config = tiny_config("gemma3", **overrides)
        # Varied continuations (not one repeated token) make the comparison
        # sharp; every float32 top-2 margin here is above 0.01, far above
        # the ~1e-6 that a different summation order changes.
        reference = randomize_weights(
            GemmaCausalLM(GemmaBackbone(**config)), seed=1, embedding_std=0.15)
        values = [keras.ops.convert_to_numpy(w) for w in reference.weights]
        expected = greedy(reference)
        generated = expected["token_ids"][:, 6:][expected["padding_mask"][:, 6:]]
        assert len(set(generated.tolist())) > 3, expected
        if everything:
            expected_beam = greedy(reference, sampler="beam")

        mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
        distribution = keras.distribution.ModelParallel(
            layout_map=reference.backbone.get_layout_map(mesh),
            batch_dim_name="batch")
        with distribution.scope():
            sharded = GemmaCausalLM(GemmaBackbone(**config))
            for variable, value in zip(sharded.weights, values):
                variable.assign(value)
            attention = sharded.backbone.transformer_layers[0].attention
            model_size = shape[1]
            key_spec = tuple(attention.key.kernel.value.sharding.spec)
            assert config["num_key_value_heads"] < model_size
            assert key_spec[:2] == (None, "model"), (name, key_spec)
            query_spec = tuple(attention.query.kernel.value.sharding.spec)
            heads_split = config["num_query_heads"] % model_size == 0
            assert query_spec[:2] == (
                ("model", None) if heads_split else (None, "model")), query_spec
            embedding = sharded.backbone.token_embedding.embeddings
            assert tuple(embedding.value.sharding.spec)[0] == "model"

            output = greedy(sharded)
            np.testing.assert_array_equal(
                output["token_ids"], expected["token_ids"], err_msg=name)
            np.testing.assert_array_equal(
                output["padding_mask"], expected["padding_mask"], err_msg=name)
            if everything:
                # The streaming loop donates its sharded state between calls.
                *_, rows = sharded.decode_engine.stream(
                    PROMPTS["token_ids"], PROMPTS["padding_mask"], NEW_TOKENS,
                    chunk_size=3)
                lengths = PROMPTS["padding_mask"].sum(axis=1)
                for row, length in enumerate(lengths):
                    np.testing.assert_array_equal(
                        rows[row],
                        expected["token_ids"][row, length:length + NEW_TOKENS])
                np.testing.assert_array_equal(
                    greedy(sharded, sampler="beam")["token_ids"],
                    expected_beam["token_ids"], err_msg=name)
        print(name, "ok")
    print("sharded generate ok")
    """
)


def _run_on_eight_devices(script):
    environment = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


_JAX_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="sharding over simulated devices is tested on the JAX backend",
)


@_JAX_ONLY
def test_model_parallel_matches_unsharded():
    result = _run_on_eight_devices(_FORWARD_AND_FIT_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


@_JAX_ONLY
def test_model_parallel_generate_matches_unsharded_token_ids():
    result = _run_on_eight_devices(_GENERATE_SCRIPT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "sharded generate ok" in result.stdout


def test_mesh_without_named_axes_is_rejected():
    backbone = GemmaBackbone(**tiny_config())
    devices = ["cpu:0"]
    mesh = keras.distribution.DeviceMesh((1,), ["data"], devices)
    with pytest.raises(ValueError, match="model_parallel_dim_name"):
        backbone.get_layout_map(mesh)
    mesh = keras.distribution.DeviceMesh((1, 1), ["data", "model"], devices)
    with pytest.raises(ValueError, match="data_parallel_dim_name"):
        backbone.get_layout_map(mesh)
    with pytest.raises(ValueError, match="`model_parallel_dim_name` is 'tensor'"):
        backbone.get_layout_map(
            mesh, model_parallel_dim_name="tensor", data_parallel_dim_name="data"
        )
    layout_map = backbone.get_layout_map(mesh, data_parallel_dim_name="data")
    down = layout_map["backbone/decoder_block_0/ffw/down/kernel"]
    assert tuple(down.axes) == ("model", None)
