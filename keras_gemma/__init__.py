"""keras-gemma: Gemma language models in Keras 3, on JAX, PyTorch or TensorFlow."""

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.feedforward import GeGLUFeedForward
from keras_gemma.layers.rms_normalization import GemmaRMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding
from keras_gemma.layers.token_embedding import TiedTokenEmbedding
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

__version__ = "0.1.0"

__all__ = [
    "GeGLUFeedForward",
    "GemmaAttention",
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaDecoderBlock",
    "GemmaRMSNormalization",
    "RotaryEmbedding",
    "TiedTokenEmbedding",
]
