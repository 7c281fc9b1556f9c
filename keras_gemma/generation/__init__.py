"""Text generation: samplers, the compiled decode loop and streaming."""

from keras_gemma.generation.decode_loop import DecodeEngine, bucket_length
from keras_gemma.generation.samplers import (
    BeamSampler,
    GreedySampler,
    RandomSampler,
    Sampler,
    TopKSampler,
    TopPSampler,
)
from keras_gemma.generation.streaming import TextStreamer

__all__ = [
    "BeamSampler",
    "DecodeEngine",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TextStreamer",
    "TopKSampler",
    "TopPSampler",
    "bucket_length",
]
