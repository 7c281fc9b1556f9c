"""The compiled decode loop against transformers' own greedy generation.

Tiny random transformers models (Gemma 1, 2, 3, random norm weights) are
the reference: greedy `generate` on a batch of prompts of unequal lengths
must give, for every prompt, exactly the ids of transformers'
`generate(do_sample=False)` on that prompt alone, with prompt plus output
longer than the sliding window.

Compiling is the slow part on JAX and TensorFlow, so the tests share three
models and keep to a few shape buckets and samplers.
"""

import keras
import numpy as np
import pytest
import torch

from keras_gemma import GemmaCausalLM
from keras_gemma.generation.decode_loop import bucket_length
from tests.transformers_reference import (
    build_reference_model,
    reference_logits,
    save_reference_model,
)

WINDOW = 4
FAMILIES = {
    "gemma": {"num_hidden_layers": 2},
    "gemma2": {"num_hidden_layers": 2, "sliding_window": WINDOW},
    "gemma3_text": {
        "num_hidden_layers": 2,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}
PROMPTS = [[2, 5, 9, 11, 40, 17, 8], [2, 33], [2, 71, 12, 45]]
OTHER_PROMPTS = [[2, 15, 61, 3, 27], [2, 80, 44, 19, 52, 6, 7, 90, 31], [2, 58]]
NEW_TOKENS = 20


def _reference_model(family):
    model = build_reference_model(family, seed=1, **FAMILIES[family])
    # Smaller embeddings keep the tied-embedding model from repeating one
    # token: the generated sequences vary, which makes the test sharper.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.1)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`{family: (transformers model, GemmaCausalLM)}`, built once."""
    built = {}
    for family in FAMILIES:
        reference = _reference_model(family)
        directory = tmp_path_factory.mktemp(family)
        save_reference_model(reference, directory)
        built[family] = (reference, GemmaCausalLM.from_preset(directory))
    return built


def reference_greedy(model, prompt, max_new_tokens, eos_token_id=None):
    """transformers' greedy continuation of one prompt (stop token kept)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    new = output[0, len(prompt) :].tolist()
    if eos_token_id is not None and eos_token_id in new:
        new = new[: new.index(eos_token_id) + 1]
    return new


def right_padded(prompts, width=None):
    width = width or max(len(p) for p in prompts)
    token_ids = np.zeros((len(prompts), width), np.int32)
    padding_mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        padding_mask[row, : len(prompt)] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def new_tokens(output, prompts):
    """Generated ids per row of a `generate` dict output."""
    lengths = output["padding_mask"].sum(axis=1)
    return [
        output["token_ids"][row, len(prompt) : lengths[row]].tolist()
        for row, prompt in enumerate(prompts)
    ]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 7, 16, 17, 33, 512, 513)] == [
        16,
        16,
        16,
        32,
        64,
        512,
        1024,
    ]
    assert bucket_length(1030) == 1536


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_without_retracing(models, family):
    reference, lm = models[family]
    output = lm.generate(
        right_padded(PROMPTS), max_new_tokens=NEW_TOKENS, stop_token_ids=None
    )
    assert output["token_ids"].shape == (3, len(PROMPTS[0]) + NEW_TOKENS)
    for row, prompt in enumerate(PROMPTS):
        assert output["token_ids"][row, : len(prompt)].tolist() == prompt
        assert output["padding_mask"][row].sum() == len(prompt) + NEW_TOKENS
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]
    assert new_tokens(output, PROMPTS) == expected
    # Prompt plus output go well past the sliding window.
    assert len(PROMPTS[0]) + NEW_TOKENS > 4 * WINDOW

    # New prompt lengths and a new token budget in the same buckets: the
    # compiled loop is reused, not traced again.
    traces = lm.decode_engine.trace_count
    output = lm.generate(
        right_padded(OTHER_PROMPTS), max_new_tokens=NEW_TOKENS - 3, stop_token_ids=None
    )
    assert lm.decode_engine.trace_count == traces
    expected = [reference_greedy(reference, p, NEW_TOKENS - 3) for p in OTHER_PROMPTS]
    assert new_tokens(output, OTHER_PROMPTS) == expected


def test_stop_tokens_match_transformers(models):
    reference, lm = models["gemma3_text"]
    greedy = reference_greedy(reference, PROMPTS[0], NEW_TOKENS)
    stop = greedy[6]
    traces = lm.decode_engine.trace_count
    output = lm.generate(
        right_padded(PROMPTS), max_new_tokens=NEW_TOKENS, stop_token_ids=[stop]
    )
    generated = new_tokens(output, PROMPTS)
    assert generated[0] == greedy[: greedy.index(stop) + 1]
    expected = [reference_greedy(reference, p, NEW_TOKENS, stop) for p in PROMPTS]
    assert generated == expected
    # Rows that stopped are padded; the mask covers the stop token.
    assert (output["token_ids"][0][~output["padding_mask"][0]] == 0).all()
    assert lm.decode_engine.trace_count == traces


def test_max_length_limits_each_row(models):
    reference, lm = models["gemma"]
    output = lm.generate(right_padded(PROMPTS), max_length=30, stop_token_ids=None)
    traces = lm.decode_engine.trace_count  # the other lengths reuse its traces
    assert output["padding_mask"].sum(axis=1).tolist() == [30, 30, 30]
    expected = [reference_greedy(reference, p, 30 - len(p)) for p in PROMPTS]
    assert new_tokens(output, PROMPTS) == expected
    both = lm.generate(
        right_padded(PROMPTS), max_length=24, max_new_tokens=20, stop_token_ids=None
    )
    assert both["padding_mask"].sum(axis=1).tolist() == [24, 22, 24]
    # Without either, a dict is filled up to its own width.
    wide = lm.generate(right_padded(PROMPTS, width=27), stop_token_ids=None)
    assert wide["padding_mask"].sum(axis=1).tolist() == [27, 27, 27]
    assert new_tokens(wide, PROMPTS) == [
        e[: 27 - len(p)] for e, p in zip(expected, PROMPTS)
    ]
    assert lm.decode_engine.trace_count == traces


def test_cached_decoding_logits_equal_full_recomputation(models):
    reference, lm = models["gemma3_text"]
    batch = right_padded(PROMPTS)
    rows, logits = lm.decode_engine.generate(
        batch["token_ids"],
        batch["padding_mask"],
        max_new_tokens=NEW_TOKENS,
        return_logits=True,
    )
    for prompt, row, row_logits in zip(PROMPTS, rows, logits):
        sequence = np.array([prompt + row.tolist()])
        full = reference_logits(reference, sequence, np.ones_like(sequence))[0]
        positions = np.arange(len(prompt) - 1, sequence.shape[1] - 1)
        np.testing.assert_allclose(row_logits, full[positions], atol=1e-4, rtol=0)


def test_tensorflow_prefills_float32_models_without_xla():
    """The prefill has no loop: on TensorFlow's CPU a float32 model's runs
    in the graph runtime, sparing XLA's compilation; the decode loop, and
    the prefill once the weights are int8, are compiled by XLA. Other
    backends have no such choice."""
    from keras_gemma import GemmaBackbone
    from keras_gemma.generation import decode_loop
    from tests.tiny_configs import BASE

    backbone = GemmaBackbone(**dict(BASE, vocabulary_size=128))
    engine = decode_loop.DecodeEngine(backbone)
    batch = right_padded(PROMPTS)
    on_tensorflow = keras.backend.backend() == "tensorflow"

    def compiled_by_xla():
        return {
            key[0]: function._jit_compile for key, function in engine._functions.items()
        }

    float_rows = engine.generate(batch["token_ids"], batch["padding_mask"], 4)
    assert engine._graph_runtime_suffices == on_tensorflow
    if on_tensorflow:
        assert compiled_by_xla() == {"start": False, "advance": True}
    backbone.quantize("int8")
    int8_rows = engine.generate(batch["token_ids"], batch["padding_mask"], 4)
    assert not engine._graph_runtime_suffices
    if on_tensorflow:
        assert compiled_by_xla() == {"start": True, "advance": True}
    assert [len(row) for row in float_rows + int8_rows] == [4] * 6


def test_tensorflow_compiles_the_prefill_of_a_long_prompt(monkeypatch):
    """Past `_GRAPH_RUNTIME_MAX_PROMPT_TOKENS` prompt tokens (the batch
    times its bucketed width), XLA's faster prefill pays for its
    compilation: the same float32 model's prefill is then compiled, and a
    short prompt's still runs in the graph runtime."""
    from keras_gemma import GemmaBackbone
    from keras_gemma.generation import decode_loop
    from tests.tiny_configs import BASE

    monkeypatch.setattr(decode_loop, "_GRAPH_RUNTIME_MAX_PROMPT_TOKENS", 32)
    engine = decode_loop.DecodeEngine(GemmaBackbone(**dict(BASE, vocabulary_size=128)))
    short = right_padded(PROMPTS[:2])  # 2 x 16 tokens
    long = right_padded(PROMPTS)  # 3 x 16
    short_rows = engine.generate(short["token_ids"], short["padding_mask"], 3)
    long_rows = engine.generate(long["token_ids"], long["padding_mask"], 3)
    starts = {
        key[-1]: function
        for key, function in engine._functions.items()
        if key[0] == "start"
    }
    assert set(starts) == {True, False}  # one prefill program each
    if keras.backend.backend() == "tensorflow":
        assert not starts[True]._jit_compile and starts[False]._jit_compile
    for row, expected in zip(long_rows, short_rows):
        np.testing.assert_array_equal(row, expected)


# -- samplers in the loop -------------------------------------------------


def test_sampling_is_reproducible_with_a_seed(models):
    _, lm = models["gemma3_text"]
    sampler = {"name": "random", "temperature": 2.0}
    batch = right_padded(PROMPTS)

    def sample(seed):
        output = lm.generate(
            batch, max_new_tokens=16, stop_token_ids=None, sampler=sampler, seed=seed
        )
        return new_tokens(output, PROMPTS)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_top_k_one_and_one_beam_equal_greedy(models):
    _, lm = models["gemma3_text"]
    batch = right_padded(PROMPTS)
    greedy = lm.generate(batch, max_new_tokens=NEW_TOKENS, stop_token_ids=None)
    for sampler in ({"name": "top_k", "k": 1}, {"name": "beam", "num_beams": 1}):
        output = lm.generate(
            batch,
            max_new_tokens=NEW_TOKENS,
            stop_token_ids=None,
            sampler=sampler,
            seed=3,
        )
        np.testing.assert_array_equal(output["token_ids"], greedy["token_ids"])


def _reference_beam_search(model, prompt, beams, steps):
    """Beam search by full recomputation with transformers' logits."""
    hypotheses = [(0.0, [])]
    for _ in range(steps):
        candidates = []
        for score, tokens in hypotheses:
            sequence = np.array([prompt + tokens])
            logits = reference_logits(model, sequence, np.ones_like(sequence))[0, -1]
            log_probs = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
            for token, value in enumerate(log_probs.tolist()):
                candidates.append((score + value, tokens + [token]))
        candidates.sort(key=lambda candidate: -candidate[0])
        hypotheses = candidates[:beams]
    return hypotheses[0][1]


def test_beam_search_matches_a_reference_beam_search(models):
    reference, lm = models["gemma3_text"]
    steps, beams = 6, 3
    output = lm.generate(
        right_padded(PROMPTS[:2]),
        max_new_tokens=steps,
        stop_token_ids=None,
        sampler={"name": "beam", "num_beams": beams, "length_penalty": 0.0},
    )
    expected = [_reference_beam_search(reference, p, beams, steps) for p in PROMPTS[:2]]
    assert new_tokens(output, PROMPTS[:2]) == expected
