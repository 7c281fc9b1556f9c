"""keras-gemma: Gemma language models in Keras 3, on JAX, PyTorch or TensorFlow."""

from keras_gemma.chat import chat_segments, render_chat
from keras_gemma.checkpoints.preset_registry import list_presets
from keras_gemma.generation.samplers import (
    BeamSampler,
    GreedySampler,
    RandomSampler,
    Sampler,
    TopKSampler,
    TopPSampler,
)
from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.feedforward import GeGLUFeedForward
from keras_gemma.layers.rms_normalization import GemmaRMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding
from keras_gemma.layers.token_embedding import TiedTokenEmbedding
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm import GemmaCausalLM
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
    "BeamSampler",
    "GeGLUFeedForward",
    "GemmaAttention",
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaCausalLMPreprocessor",
    "GemmaDecoderBlock",
    "GemmaRMSNormalization",
    "GemmaTokenizer",
    "GreedySampler",
    "RandomSampler",
    "RotaryEmbedding",
    "Sampler",
    "TiedTokenEmbedding",
    "TopKSampler",
    "TopPSampler",
    "chat_segments",
    "list_presets",
    "render_chat",
]
