"""Serving a tensor-parallel model over HTTP (`shardwise serve`).

    protocol  the rank protocol: rank 0 broadcasts each step's work (a small header, token ids); the other
              ranks loop on it and run the same forward, so every collective inside the model matches up
    engine    rank 0's request loop: queue, prefill/decode, sampling (greedy, temperature, top_p, seed), stop
              handling, text streaming, metrics
    metrics   counters and histograms rendered in the Prometheus text format
    api       the OpenAI-compatible FastAPI app (/v1/completions, /v1/chat/completions, /v1/models, /metrics)

Requests are served one at a time (serial; concurrent requests wait in the queue)."""

from .engine import Engine, GenerationRequest
from .protocol import Decoder, Leader, follow

__all__ = ["Decoder", "Engine", "GenerationRequest", "Leader", "follow"]
