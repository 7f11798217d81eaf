"""Rank 0's serving loop: take requests from a queue one at a time, prefill, decode token by token through
the rank protocol, choose tokens (greedy or sampled), apply stop conditions and stream text back.

Requests are served serially: a request waits in the queue while another decodes. Each request's events go
to its `sink(kind, payload)`, called from the engine thread: ("text", str delta), then ("done", {"text",
"finish_reason", "prompt_tokens", "completion_tokens"}) or ("error", message)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..comm import events
from .metrics import Metrics
from .protocol import Leader


@dataclass
class GenerationRequest:
    prompt_ids: torch.Tensor  # [1, s] int64
    max_tokens: int
    sink: Callable[[str, object], None]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh draw per request
    stop: list[str] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client went away


def choose(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """logits [vocab] -> a token id: argmax at temperature 0, else a draw from softmax(logits / T) restricted
    to the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens: keep while < top_p
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stop: list[str]) -> int:
    """Characters at the end of `text` not to stream yet: an incomplete character (U+FFFD from a partial
    multi-byte sequence) or the start of a stop string that the next tokens may complete."""
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


class Engine:
    """decode(ids: list[int]) -> str; eos_ids: tokens that end a sequence (not part of the text)."""

    def __init__(self, leader: Leader, decode: Callable[[list[int]], str], eos_ids: set[int], metrics: Metrics):
        self.leader, self.decode, self.eos_ids, self.metrics = leader, decode, eos_ids, metrics
        self.requests: queue.Queue[GenerationRequest] = queue.Queue()
        self.stopping = threading.Event()
        self._comm_s = 0.0

    def submit(self, request: GenerationRequest) -> None:
        self.requests.put(request)
        self.metrics.queue_length = self.requests.qsize()

    def _observe(self, event) -> None:  # sums the model's collective time (rank 0's view)
        if isinstance(event, events.CollectiveEvent) and event.seconds is not None:
            self._comm_s += event.seconds

    def run(self, heartbeat_s: float = 1.0) -> None:
        """Serve until `stopping` is set; then tell the followers to leave. A failed collective (a peer died)
        propagates: the caller stops the server."""
        events.add_observer(self._observe)
        try:
            while not self.stopping.is_set():
                try:
                    request = self.requests.get(timeout=heartbeat_s)
                except queue.Empty:
                    self.leader.idle()  # keeps the followers' broadcast from timing out; notices a dead peer
                    continue
                self.metrics.queue_length = self.requests.qsize()
                self._serve(request)
            self.leader.shutdown()
        finally:
            events.remove_observer(self._observe)

    def _serve(self, req: GenerationRequest) -> None:
        gen = torch.Generator().manual_seed(req.seed if req.seed is not None else int(torch.seed() % 2**63))
        tokens: list[int] = []
        streamed, finish, cut = "", "length", -1
        last, failed = None, None
        try:
            self._comm_s = 0.0
            logits = self.leader.prefill(req.prompt_ids)
            while True:
                try:  # this request's own failure (e.g. NaN logits): a 500 for it, the server keeps serving
                    token = choose(logits, req.temperature, req.top_p, gen)
                except (RuntimeError, ValueError) as exc:
                    failed = f"choosing token {len(tokens) + 1} failed: {exc}"
                    break
                now = time.monotonic()
                if token in self.eos_ids:
                    finish = "stop"
                    break
                tokens.append(token)
                latency, ttft = (None, now - req.arrived) if last is None else (now - last, None)
                self.metrics.token(latency, ttft, self._comm_s)
                last = now
                text = self.decode(tokens)
                cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                safe = text[: len(text) - _held_back(text, req.stop)]
                if safe.startswith(streamed) and len(safe) > len(streamed):
                    req.sink("text", safe[len(streamed) :])
                    streamed = safe
                if len(tokens) >= req.max_tokens or req.cancelled.is_set():
                    finish = "length" if not req.cancelled.is_set() else "cancelled"
                    break
                self._comm_s = 0.0
                logits = self.leader.step(token)
            if cut < 0:  # a stop string's cut text is final already
                text = self.decode(tokens)
        finally:
            self.leader.end()  # the followers leave this request whatever happened here
        if failed is not None:
            req.sink("error", failed)
            self.metrics.request_done("error")
            return
        if text.startswith(streamed) and len(text) > len(streamed):
            req.sink("text", text[len(streamed) :])
        req.sink("done", {"text": text, "finish_reason": finish, "prompt_tokens": int(req.prompt_ids.shape[1]),
                          "completion_tokens": len(tokens)})  # fmt: skip
        self.metrics.request_done("cancelled" if finish == "cancelled" else "ok")
