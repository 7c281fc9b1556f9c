"""GGUF import on small files written like llama.cpp's converter writes Gemma:
tensor names, +1 on norm weights, metadata keys, quantized types."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from keras_gemma.checkpoints import gguf_format, preset_loading, sources
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer
from tests.checkpoints.helpers import (
    assert_close,
    batch,
    logits,
    tiny_proto,
    tiny_vocabulary_size,
)
from tests.transformers_reference import build_reference_model, reference_logits

# transformers name (after "model.") -> llama.cpp GGUF name, per block.
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(family, key):
    key = key.removeprefix("model.").removesuffix(".weight")
    if key == "embed_tokens":
        return "token_embd.weight"
    if key == "norm":
        return "output_norm.weight"
    _, index, rest = key.split(".", 2)
    if family == "gemma" and rest == "post_attention_layernorm":
        return f"blk.{index}.ffn_norm.weight"  # Gemma 1's pre-FFN norm
    return f"blk.{index}.{_BLOCK[rest]}.weight"


def _add_vocabulary(writer, proto):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(proto)
    piece = model_pb2.ModelProto.SentencePiece
    types = {
        piece.NORMAL: gguf.TokenType.NORMAL,
        piece.UNKNOWN: gguf.TokenType.CONTROL,
        piece.CONTROL: gguf.TokenType.CONTROL,
        piece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
        piece.UNUSED: gguf.TokenType.UNUSED,
        piece.BYTE: gguf.TokenType.BYTE,
    }
    writer.add_tokenizer_model("llama")
    writer.add_token_list([entry.piece for entry in model.pieces])
    writer.add_token_scores([entry.score for entry in model.pieces])
    writer.add_token_types([int(types[entry.type]) for entry in model.pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


def write_gguf(path, model, family, types=None, chat_template=None, extra=None):
    """Writes a transformers Gemma model as llama.cpp would: GGUF names,
    norms stored as 1 + weight, `types[gguf_name]` quantization (F32 by
    default). Returns the dequantized value of each GGUF tensor."""
    architecture = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[
        family
    ]
    c = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(512)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if family == "gemma3_text":
        writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    else:
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if family != "gemma":
        writer.add_sliding_window(c.sliding_window)
    if family == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    _add_vocabulary(writer, tiny_proto())
    if chat_template:
        writer.add_chat_template(chat_template)
    stored = {}
    for key, value in model.state_dict().items():
        if not key.startswith("model."):
            continue  # lm_head: tied to the embedding, never stored
        name = _gguf_name(family, key)
        array = value.detach().float().numpy()
        if name.endswith("norm.weight"):
            array = array + 1.0
        kind = (types or {}).get(name, Q.F32)
        if kind == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
            stored[name] = array.astype(np.float32)
        elif kind == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
            stored[name] = array.astype(np.float16).astype(np.float32)
        else:
            raw = quantize(array.astype(np.float32), kind)
            writer.add_tensor(name, raw, raw_dtype=kind)
            stored[name] = dequantize(raw, kind).reshape(array.shape)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


CASES = {
    "gemma": ("gemma", {"num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": (
        "gemma2",
        {
            "num_key_value_heads": 2,
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    # Gemma 3 GGUF files carry no layer pattern, local RoPE base or query
    # scaling: every sixth layer global, local base 10k, head_dim scaling.
    "gemma3": (
        "gemma3_text",
        {"num_hidden_layers": 7, "sliding_window": 4, "query_pre_attn_scalar": 16},
    ),
}


def _reference(name, **extra):
    family, overrides = CASES[name]
    overrides = {**overrides, **extra}
    return build_reference_model(
        family, vocab_size=tiny_vocabulary_size(), **overrides
    ), family


@pytest.mark.parametrize("name", sorted(CASES))
def test_gguf_matches_transformers(name, tmp_path):
    model, family = _reference(name)
    path = tmp_path / "model.gguf"
    write_gguf(path, model, family)
    assert sources.resolve(path).format == "gguf"
    lm = preset_loading.load_causal_lm(path)
    token_ids, padding_mask = batch(model.config.vocab_size, length=11)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )
    # The tokenizer is rebuilt from the GGUF vocabulary.
    text = "Hello world, how are you today?"
    assert lm.preprocessor.tokenizer.tokenize(text) == GemmaTokenizer(
        proto=tiny_proto()
    ).tokenize(text)
    assert not lm.instruction_tuned


def test_gemma3_configuration_defaults():
    model, family = _reference("gemma3")
    import tempfile

    path = tempfile.mkdtemp() + "/model.gguf"
    write_gguf(path, model, family)
    with gguf_format.GGUFFile(path) as gguf_file:
        config = gguf_format.backbone_config_from_gguf(gguf_file)
    assert config["layer_types"] == ["local"] * 5 + ["global", "local"]
    assert config["rope_max_wavelength"] == {"global": 1e6, "local": 1e4}
    assert config["query_pre_attn_scalar"] == 16
    assert config["layer_norm_epsilon"] == 1e-6
    assert config["use_query_key_norm"] and config["use_post_ffw_norm"]


def test_quantized_tensors_are_dequantized(tmp_path):
    """F16, BF16, Q8_0 and Q5_0 tensors: the model computes with exactly
    what `gguf.quants.dequantize` gives for the stored blocks."""
    model, family = _reference("gemma2", intermediate_size=64)
    types = {}
    for index in range(model.config.num_hidden_layers):
        types.update(
            {
                f"blk.{index}.attn_q.weight": Q.Q8_0,
                f"blk.{index}.attn_k.weight": Q.Q5_0,
                f"blk.{index}.attn_v.weight": Q.BF16,
                f"blk.{index}.ffn_gate.weight": Q.Q8_0,
                f"blk.{index}.ffn_up.weight": Q.Q5_0,
                f"blk.{index}.ffn_down.weight": Q.Q8_0,
            }
        )
    types["token_embd.weight"] = Q.F16
    path = tmp_path / "quantized.gguf"
    stored = write_gguf(path, model, family, types=types)
    with gguf_format.GGUFFile(path) as gguf_file:
        assert gguf_file.tensor_type("blk.0.attn_k.weight") == "Q5_0"
        for name, expected in stored.items():
            np.testing.assert_array_equal(gguf_file.tensor(name), expected)
    # The reference runs on the dequantized weights.
    with torch.no_grad():
        for key, parameter in model.state_dict().items():
            if not key.startswith("model."):
                continue
            value = stored[_gguf_name(family, key)]
            if key.endswith("norm.weight"):
                value = value - 1.0
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    lm = preset_loading.load_causal_lm(path)
    token_ids, padding_mask = batch(model.config.vocab_size)
    assert_close(
        reference_logits(model, token_ids, padding_mask),
        logits(lm, token_ids, padding_mask),
        padding_mask,
    )


def _k_quant_blocks(rng, rows, kind):
    """Random k-quant blocks with finite scales (`d`, `dmin` as float16)."""
    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if kind == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[:, 0:2] = scale
        raw[:, 2:4] = scale
    else:  # Q6_K: ql[128], qh[64], scales[16], d
        raw[:, 208:210] = scale
    return raw


def test_k_quant_tensors(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "k_quants.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    blocks = {
        "a.weight": (_k_quant_blocks(rng, 3, Q.Q4_K), Q.Q4_K),
        "b.weight": (_k_quant_blocks(rng, 2, Q.Q6_K), Q.Q6_K),
    }
    for name, (raw, kind) in blocks.items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with gguf_format.GGUFFile(path) as gguf_file:
        for name, (raw, kind) in blocks.items():
            values = gguf_file.tensor(name)
            assert values.shape == (raw.shape[0], 256)
            assert gguf_file.tensor_type(name) == kind.name
            np.testing.assert_array_equal(values, dequantize(raw, kind))
            assert np.isfinite(values).all()


def test_chat_template_marks_instruction_tuned(tmp_path):
    model, family = _reference("gemma")
    path = tmp_path / "model.gguf"
    write_gguf(path, model, family, chat_template="{{ '<start_of_turn>user\n' }}")
    assert preset_loading.is_instruction_tuned(path)


def test_unsupported_architecture_and_extra_tensors(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'llama' model"):
        preset_loading.load_backbone(path)

    model, family = _reference("gemma")
    path = tmp_path / "untied.gguf"
    vocabulary, hidden = model.config.vocab_size, model.config.hidden_size
    untied = {"output.weight": np.zeros((vocabulary, hidden), np.float32)}
    write_gguf(path, model, family, extra=untied)
    with pytest.raises(ValueError, match="does not use: \\['output.weight'\\]"):
        preset_loading.load_backbone(path)

    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_format.GGUFFile(tmp_path / "fake.gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        preset_loading.load_backbone(tmp_path / "fake.gguf")
