"""Samplers on logits: the math of each, names, settings and validation."""

import keras
import numpy as np
import pytest

from keras_gemma.generation import samplers


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _uniform(seed):
    rng = np.random.default_rng(seed)
    return lambda shape: rng.uniform(1e-6, 1.0, size=tuple(shape)).astype("float32")


LOGITS = np.log(np.array([[0.05, 0.5, 0.3, 0.15], [0.4, 0.1, 0.1, 0.4]], "float32"))


def test_greedy_is_argmax():
    tokens = _numpy(samplers.GreedySampler().next_tokens(LOGITS))
    assert tokens.tolist() == [1, 0]


def test_first_argmax_matches_numpy_on_ties_infinities_and_nan():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 1000)).astype("float32")
    values[1, [10, 700]] = 50.0  # a tie: the first wins
    values[2, 5] = np.inf
    values[3, [40, 900]] = np.nan  # NaN counts as the largest, as in argmax
    values[4, :] = -np.inf
    values[5, [3, 7]] = [np.inf, np.nan]
    tokens = _numpy(samplers.first_argmax(values))
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, np.argmax(values, axis=-1))
    # A vocabulary's width, reduced in parallel: still the first of a tie.
    wide = rng.normal(size=(3, 262144)).astype("float32")
    wide[0, [200_000, 300, 100]] = 50.0  # ties within and across blocks
    wide[1, [250_000, 60_001, 60_000]] = np.nan
    wide[2, :] = -np.inf
    assert _numpy(samplers.first_argmax(wide)).tolist() == [100, 60_000, 0]


def test_top_k_one_and_top_p_small_equal_greedy():
    # The second row has a tie: top-k with k=1 still picks argmax's token.
    greedy = _numpy(samplers.GreedySampler().next_tokens(LOGITS))
    for seed in range(5):
        noise = _uniform(seed)
        top_k = samplers.TopKSampler(k=1, temperature=3.0).next_tokens(LOGITS, noise)
        top_p = samplers.TopPSampler(p=0.01).next_tokens(LOGITS[:1], noise)
        np.testing.assert_array_equal(_numpy(top_k), greedy)
        np.testing.assert_array_equal(_numpy(top_p), greedy[:1])


def _frequencies(sampler, logits, draws=4000):
    batch = np.repeat(logits[:1], draws, axis=0)
    tokens = _numpy(sampler.next_tokens(batch, _uniform(1)))
    return np.bincount(tokens, minlength=logits.shape[1]) / draws


def test_random_sampler_follows_the_distribution():
    frequencies = _frequencies(samplers.RandomSampler(), LOGITS)
    np.testing.assert_allclose(frequencies, [0.05, 0.5, 0.3, 0.15], atol=0.03)
    # A low temperature concentrates the mass on the most likely token.
    cold = _frequencies(samplers.RandomSampler(temperature=0.1), LOGITS)
    assert cold[1] > 0.95


def test_top_k_keeps_only_the_k_best():
    frequencies = _frequencies(samplers.TopKSampler(k=2), LOGITS)
    assert frequencies[0] == 0 and frequencies[3] == 0
    np.testing.assert_allclose(frequencies[1], 0.5 / 0.8, atol=0.03)


def test_top_p_keeps_the_nucleus():
    # 0.5 + 0.3 reaches p = 0.7: tokens 1 and 2 only.
    frequencies = _frequencies(samplers.TopPSampler(p=0.7), LOGITS)
    assert frequencies[0] == 0 and frequencies[3] == 0
    np.testing.assert_allclose(frequencies[1], 0.5 / 0.8, atol=0.03)
    # p = 1 keeps everything; a `k` limit applies first.
    assert (_frequencies(samplers.TopPSampler(p=1.0), LOGITS) > 0).all()
    limited = _frequencies(samplers.TopPSampler(p=1.0, k=1), LOGITS)
    assert limited[1] == 1.0


def test_get_by_name_dict_and_object():
    assert isinstance(samplers.get("greedy"), samplers.GreedySampler)
    assert isinstance(samplers.get("random"), samplers.RandomSampler)
    assert samplers.get("top_k").k == 5
    assert samplers.get({"name": "top_p", "p": 0.5}).p == 0.5
    assert samplers.get({"name": "beam", "num_beams": 3}).num_beams == 3
    sampler = samplers.TopKSampler(k=3, temperature=0.5)
    assert samplers.get(sampler) is sampler
    assert samplers.get(samplers.serialize(sampler)).get_config() == (
        sampler.get_config()
    )
    assert sampler.cache_key() == samplers.TopKSampler(k=3, temperature=0.5).cache_key()
    assert sampler.cache_key() != samplers.TopKSampler(k=4).cache_key()


@pytest.mark.parametrize(
    "identifier, message",
    [
        ("nucleus", "Unknown `sampler` 'nucleus'; allowed names"),
        (3, "`sampler` must be a Sampler"),
        ({"name": "top_p", "p": 0.0}, r"`top_p` \(`p`\) must be in \(0, 1\]"),
        ({"name": "top_p", "p": 1.5}, r"`top_p` \(`p`\) must be in \(0, 1\]"),
        ({"name": "top_k", "k": 0}, "`k` must be a positive integer"),
        ({"name": "top_k", "k": 2.5}, "`k` must be a positive integer"),
        ({"name": "random", "temperature": 0}, "`temperature` must be a number > 0"),
        ({"name": "top_k", "temperature": -1.0}, "`temperature` must be"),
        ({"name": "beam", "num_beams": 0}, "`num_beams` must be a positive integer"),
        ({"name": "greedy", "k": 3}, "Invalid settings for sampler 'greedy'"),
    ],
)
def test_invalid_samplers(identifier, message):
    with pytest.raises(ValueError, match=message):
        samplers.get(identifier)
