"""Tiny random Gemma models built with transformers, the numerical reference."""

import copy

import numpy as np
import torch
import transformers

FAMILIES = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
}

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


def build_reference_model(family, seed=0, **overrides):
    """A tiny random transformers model of `family` with random norm weights.

    Norm weights default to zeros in transformers, which would hide a wrong
    `(1 + scale)` convention, so every parameter is drawn at random.
    """
    config_class, model_class = FAMILIES[family]
    settings = dict(TINY)
    settings.update(overrides)
    config = config_class(**settings)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def save_reference_model(model, directory, dtype=torch.float32, **kwargs):
    """Saves a copy of `model` in `dtype`; `model` itself is left unchanged."""
    copy.deepcopy(model).to(dtype).save_pretrained(directory, **kwargs)
    return directory


def load_reference_model(directory):
    """Reloads a saved reference model in float32 with eager attention."""
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = FAMILIES[config.model_type][1]
    return model_class.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def reference_logits(model, token_ids, padding_mask):
    with torch.no_grad():
        output = model(
            input_ids=torch.as_tensor(np.asarray(token_ids), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(padding_mask), dtype=torch.long),
        )
    return output.logits.float().numpy()
