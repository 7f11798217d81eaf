"""Serving a tensor-parallel model over HTTP (`shardwise serve`).

    protocol  the rank protocol: rank 0 broadcasts each step's work (a small header, token ids); the other
              ranks loop on it and run the same forward, so every collective inside the model matches up
    engine    rank 0's request loop: queue, step-level batching over decoder slots, sampling (greedy,
              temperature, top_p, seed), stop handling, text streaming, metrics
    metrics   counters and histograms rendered in the Prometheus text format
    api       the OpenAI-compatible FastAPI app (/v1/completions, /v1/chat/completions, /v1/models, /metrics)

Llama-family models run on shardwise.decoding's FastDecoder: concurrent requests share each decode step. Other
models run on GeneralDecoder (the parallelized module), one request at a time."""

from .engine import Engine, GenerationRequest
from .protocol import GeneralDecoder, Leader, follow

__all__ = ["Engine", "GeneralDecoder", "GenerationRequest", "Leader", "follow"]
