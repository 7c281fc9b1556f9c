"""Writes presets in the keras-hub (Kaggle) format, for tests.

keras-hub cannot be installed here, so this module rebuilds what its
`save_to_preset` writes, from the documented structure of keras-hub's Gemma
models:

- the weights file is Keras 3's `backbone.save_weights("model.weights.h5")`.
  Keras names each group after the layer's place in the model: for a
  functional model, `layers/` then the snake-cased class name of each layer
  (`reversible_embedding`, `gemma_decoder_block`, `gemma_decoder_block_1`,
  ..., `rms_normalization`), then attribute names inside a layer
  (`attention/query_dense`, `gating_ffw`, ...), then `vars/0`. To get the
  exact same paths, stand-in layers below carry keras-hub's class names
  (`ReversibleEmbedding`, `GemmaDecoderBlock` / `Gemma3DecoderBlock`,
  `CachedGemmaAttention`, `RMSNormalization`) and attribute names, and
  Keras itself writes the file. Their `call` does no real computation: only
  the weights matter.
- `config.json` is the serialized backbone: `module`, `class_name`,
  `config` (keras-hub's argument names; `intermediate_dim` counts both
  feed-forward branches for `GemmaBackbone`, one for `Gemma3Backbone`), and
  `registered_name` `keras_hub>GemmaBackbone`.
- `tokenizer.json`, `assets/tokenizer/vocabulary.spm`, `preprocessor.json`,
  `metadata.json`.

Weights come from a transformers reference model, rearranged into keras-hub's
kernel layouts: query/key/value `(heads, hidden, head_dim)`, output
`(heads, head_dim, hidden)`, feed-forward `(hidden, ffn)` and `(ffn, hidden)`.
"""

import json
import os

import keras


class ReversibleEmbedding(keras.layers.Embedding):
    """Stand-in with keras-hub's class name (tied embedding: one variable)."""


class RMSNormalization(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )

    def call(self, inputs):
        return inputs


class CachedGemmaAttention(keras.layers.Layer):
    def __init__(self, num_query_heads, num_key_value_heads, head_dim, qk_norm, **kw):
        super().__init__(**kw)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.use_query_key_norm = qk_norm

    def build(self, input_shape):
        hidden = input_shape[-1]
        heads, kv_heads, head_dim = (
            self.num_query_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        dtype = self.dtype_policy
        self.query_dense = keras.layers.EinsumDense(
            "btd,ndh->btnh", (None, heads, head_dim), name="query", dtype=dtype
        )
        self.query_dense.build(input_shape)
        self.key_dense = keras.layers.EinsumDense(
            "bsd,kdh->bskh", (None, kv_heads, head_dim), name="key", dtype=dtype
        )
        self.key_dense.build(input_shape)
        self.value_dense = keras.layers.EinsumDense(
            "bsd,kdh->bskh", (None, kv_heads, head_dim), name="value", dtype=dtype
        )
        self.value_dense.build(input_shape)
        if self.use_query_key_norm:
            self.query_norm = RMSNormalization(name="query_norm", dtype=dtype)
            self.query_norm.build((None, None, heads, head_dim))
            self.key_norm = RMSNormalization(name="key_norm", dtype=dtype)
            self.key_norm.build((None, None, kv_heads, head_dim))
        self.output_dense = keras.layers.EinsumDense(
            "btnh,nhd->btd", (None, hidden), name="attention_output", dtype=dtype
        )
        self.output_dense.build((None, None, heads, head_dim))

    def call(self, inputs):
        return inputs


class CachedGemma3Attention(CachedGemmaAttention):
    pass


class GemmaDecoderBlock(keras.layers.Layer):
    attention_class = CachedGemmaAttention

    def __init__(self, settings, **kw):
        super().__init__(**kw)
        self.settings = settings

    def build(self, input_shape):
        s = self.settings
        dtype = self.dtype_policy
        self.pre_attention_norm = RMSNormalization(
            name="pre_attention_norm", dtype=dtype
        )
        self.pre_attention_norm.build(input_shape)
        self.attention = self.attention_class(
            s["heads"],
            s["kv_heads"],
            s["head_dim"],
            s["qk_norm"],
            name="attention",
            dtype=dtype,
        )
        self.attention.build(input_shape)
        if s["post_norms"]:
            self.post_attention_norm = RMSNormalization(
                name="post_attention_norm", dtype=dtype
            )
            self.post_attention_norm.build(input_shape)
            self.post_ffw_norm = RMSNormalization(name="post_ffw_norm", dtype=dtype)
            self.post_ffw_norm.build(input_shape)
        self.pre_ffw_norm = RMSNormalization(name="pre_ffw_norm", dtype=dtype)
        self.pre_ffw_norm.build(input_shape)
        self.gating_ffw = keras.layers.EinsumDense(
            "btd,df->btf", (None, s["ffn"]), name="ffw_gating", dtype=dtype
        )
        self.gating_ffw.build(input_shape)
        self.gating_ffw_2 = keras.layers.EinsumDense(
            "btd,df->btf", (None, s["ffn"]), name="ffw_gating_2", dtype=dtype
        )
        self.gating_ffw_2.build(input_shape)
        self.ffw_linear = keras.layers.EinsumDense(
            "btf,fd->btd", (None, input_shape[-1]), name="ffw_linear", dtype=dtype
        )
        self.ffw_linear.build((None, None, s["ffn"]))

    def call(self, inputs, padding_mask=None):
        return inputs


class Gemma3DecoderBlock(GemmaDecoderBlock):
    attention_class = CachedGemma3Attention


def _heads_in(weight, heads):
    """transformers `(heads * head_dim, hidden)` -> `(heads, hidden, head_dim)`."""
    rows, hidden = weight.shape
    return weight.reshape(heads, rows // heads, hidden).transpose(0, 2, 1)


def keras_hub_config(transformers_config, family):
    """keras-hub backbone config for a transformers config."""
    c = transformers_config
    head_dim = c.head_dim
    scalar = getattr(c, "query_pre_attn_scalar", head_dim) or head_dim
    if scalar not in (head_dim, c.hidden_size // c.num_attention_heads):
        raise ValueError("keras-hub cannot express this query scaling")
    config = {
        "name": "gemma_backbone" if family != "gemma3" else "gemma3_backbone",
        "trainable": True,
        "vocabulary_size": c.vocab_size,
        "num_layers": c.num_hidden_layers,
        "num_query_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "hidden_dim": c.hidden_size,
        "intermediate_dim": c.intermediate_size * (1 if family == "gemma3" else 2),
        "head_dim": head_dim,
        "layer_norm_epsilon": c.rms_norm_eps,
        "dropout": 0,
        "query_head_dim_normalize": scalar == head_dim,
        "use_post_ffw_norm": family != "gemma",
        "use_post_attention_norm": family != "gemma",
        "final_logit_soft_cap": getattr(c, "final_logit_softcapping", None),
        "attention_logit_soft_cap": getattr(c, "attn_logit_softcapping", None),
        "use_sliding_window_attention": family != "gemma",
        "sliding_window_size": getattr(c, "sliding_window", None) or 4096,
    }
    if family == "gemma3":
        full = c.rope_parameters["full_attention"]
        config.update(
            {
                "image_size": 896,
                "use_query_key_norm": True,
                "local_rope_scaling_factor": 1.0,
                "global_rope_scaling_factor": float(full.get("factor", 1.0)),
                "vision_encoder": None,
                "use_bidirectional_attention": False,
            }
        )
    return config


def write_keras_hub_preset(
    directory, reference_model, family, proto, dtype="float32", max_shard_size=None
):
    """Writes `reference_model` (transformers) as a keras-hub preset."""
    c = reference_model.config
    os.makedirs(directory, exist_ok=True)
    settings = {
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "ffn": c.intermediate_size,
        "qk_norm": family == "gemma3",
        "post_norms": family != "gemma",
    }
    block_class = Gemma3DecoderBlock if family == "gemma3" else GemmaDecoderBlock
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    embedding = ReversibleEmbedding(
        c.vocab_size, c.hidden_size, name="token_embedding", dtype=dtype
    )
    blocks = [
        block_class(settings, name=f"decoder_block_{i}", dtype=dtype)
        for i in range(c.num_hidden_layers)
    ]
    final = RMSNormalization(name="final_normalization", dtype=dtype)
    x = embedding(token_ids)
    for block in blocks:
        x = block(x, padding_mask=padding_mask)
    model = keras.Model(
        {"token_ids": token_ids, "padding_mask": padding_mask}, final(x)
    )

    state = {
        key.removeprefix("model."): value.detach().float().numpy()
        for key, value in reference_model.state_dict().items()
    }
    embedding.embeddings.assign(state["embed_tokens.weight"])
    final.scale.assign(state["norm.weight"])
    for i, block in enumerate(blocks):
        p = f"layers.{i}."
        attention = block.attention
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        block.pre_attention_norm.scale.assign(state[p + "input_layernorm.weight"])
        attention.query_dense.kernel.assign(
            _heads_in(state[p + "self_attn.q_proj.weight"], heads)
        )
        attention.key_dense.kernel.assign(
            _heads_in(state[p + "self_attn.k_proj.weight"], kv_heads)
        )
        attention.value_dense.kernel.assign(
            _heads_in(state[p + "self_attn.v_proj.weight"], kv_heads)
        )
        o_proj = state[p + "self_attn.o_proj.weight"]  # (hidden, heads * head_dim)
        attention.output_dense.kernel.assign(
            o_proj.T.reshape(heads, c.head_dim, c.hidden_size)
        )
        if family == "gemma3":
            attention.query_norm.scale.assign(state[p + "self_attn.q_norm.weight"])
            attention.key_norm.scale.assign(state[p + "self_attn.k_norm.weight"])
        if family == "gemma":
            block.pre_ffw_norm.scale.assign(
                state[p + "post_attention_layernorm.weight"]
            )
        else:
            block.post_attention_norm.scale.assign(
                state[p + "post_attention_layernorm.weight"]
            )
            block.pre_ffw_norm.scale.assign(
                state[p + "pre_feedforward_layernorm.weight"]
            )
            block.post_ffw_norm.scale.assign(
                state[p + "post_feedforward_layernorm.weight"]
            )
        block.gating_ffw.kernel.assign(state[p + "mlp.gate_proj.weight"].T)
        block.gating_ffw_2.kernel.assign(state[p + "mlp.up_proj.weight"].T)
        block.ffw_linear.kernel.assign(state[p + "mlp.down_proj.weight"].T)

    if max_shard_size is None:
        model.save_weights(os.path.join(directory, "model.weights.h5"))
    else:
        model.save_weights(
            os.path.join(directory, "model.weights.json"), max_shard_size=max_shard_size
        )
    class_name = "Gemma3Backbone" if family == "gemma3" else "GemmaBackbone"
    module = "gemma3.gemma3_backbone" if family == "gemma3" else "gemma.gemma_backbone"
    config = keras_hub_config(c, family)
    config["dtype"] = {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": dtype},
        "registered_name": None,
    }
    _write_json(
        directory,
        "config.json",
        {
            "module": f"keras_hub.src.models.{module}",
            "class_name": class_name,
            "config": config,
            "registered_name": f"keras_hub>{class_name}",
        },
    )
    tokenizer_class = "Gemma3Tokenizer" if family == "gemma3" else "GemmaTokenizer"
    _write_json(
        directory,
        "tokenizer.json",
        {
            "module": "keras_hub.src.models.gemma.gemma_tokenizer",
            "class_name": tokenizer_class,
            "config": {"name": "gemma_tokenizer", "trainable": True, "proto": None},
            "registered_name": f"keras_hub>{tokenizer_class}",
        },
    )
    assets = os.path.join(directory, "assets", "tokenizer")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, "vocabulary.spm"), "wb") as file:
        file.write(proto)
    _write_json(
        directory,
        "preprocessor.json",
        {
            "module": "keras_hub.src.models.gemma.gemma_causal_lm_preprocessor",
            "class_name": "GemmaCausalLMPreprocessor",
            "config": {
                "name": "gemma_causal_lm_preprocessor",
                "trainable": True,
                "sequence_length": 64,
                "add_start_token": True,
                "add_end_token": True,
            },
            "registered_name": "keras_hub>GemmaCausalLMPreprocessor",
        },
    )
    _write_json(
        directory,
        "metadata.json",
        {"keras_version": keras.version(), "parameter_count": model.count_params()},
    )
    return directory


def _write_json(directory, name, content):
    with open(os.path.join(directory, name), "w") as file:
        json.dump(content, file, indent=4)
