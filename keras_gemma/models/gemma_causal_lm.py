"""Gemma causal language model: a backbone plus the tied output projection."""

import keras


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(keras.Model):
    """Predicts the next token at every position of a sequence.

    Args:
        backbone: a `GemmaBackbone`.
        preprocessor: a `GemmaCausalLMPreprocessor`, or `None` to work on
            token ids directly.

    Calling the model on `{"token_ids", "padding_mask"}` returns float32
    logits of shape `(batch, length, vocabulary_size)`.

    Example:

    >>> import numpy as np
    >>> from keras_gemma import GemmaBackbone
    >>> backbone = GemmaBackbone(vocabulary_size=50, num_layers=1,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
    ...     intermediate_dim=32, head_dim=8)
    >>> lm = GemmaCausalLM(backbone)
    >>> logits = lm({"token_ids": np.array([[2, 7, 9]]),
    ...              "padding_mask": np.array([[1, 1, 1]])})
    >>> tuple(logits.shape)
    (1, 3, 50)
    """

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor

    def call(self, inputs):
        hidden = self.backbone(inputs)
        return self.backbone.token_embedding(hidden, reverse=True)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": (
                keras.saving.serialize_keras_object(self.preprocessor)
                if self.preprocessor is not None
                else None
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(
                config["preprocessor"]
            )
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, dtype=None):
        """Builds the model (without preprocessor for now) from a checkpoint."""
        from keras_gemma.models.gemma_backbone import GemmaBackbone

        return cls(GemmaBackbone.from_preset(preset, dtype=dtype))
