"""Fast tensor-parallel decoding for Llama-family models (see engine.py for what it removes and why)."""

from .engine import FastDecoder, StepTime, build_decoder
from .weights import DecoderConfig, DenseWeights, LocalWeights, dense_weights, shard_weights

__all__ = ["DecoderConfig", "DenseWeights", "FastDecoder", "LocalWeights", "StepTime", "build_decoder", "dense_weights",
           "shard_weights"]  # fmt: skip
