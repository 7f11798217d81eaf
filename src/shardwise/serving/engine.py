"""Rank 0's serving loop with step-level (continuous) batching.

Up to `max_batch` requests are active at once, each in a decoder slot. Every iteration: admit waiting requests
into free slots (one PREFILL each, which also gives the request its first token), then ONE decode step for all
active slots together (STEP), then choose each row's token (greedy, or sampled with the request's temperature,
top_p and seed), apply stop conditions, stream text, and retire finished requests (RELEASE frees the slot for the
next iteration's admissions). A request's tokens do not depend on what it is batched with: rows are independent
in every op of the decoder.

Each request's events go to its `sink(kind, payload)`, called from the engine thread: ("text", str delta), then
("done", {"text", "finish_reason", "prompt_tokens", "completion_tokens"}) or ("error", message)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .metrics import Metrics


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


@dataclass
class _Active:
    """A request in a slot."""

    req: GenerationRequest
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    streamed: str = ""
    last: float | None = None  # monotonic time of its previous token
    next_token: int = -1  # the token the next decode step feeds for it


class Engine:
    """leader: serving.protocol.Leader (or anything with its prefill/step/release/idle/shutdown);
    decode(ids: list[int]) -> str; eos_ids: tokens that end a sequence (not part of the text)."""

    def __init__(self, leader, decode: Callable[[list[int]], str], eos_ids: set[int], metrics: Metrics):
        self.leader, self.decode, self.eos_ids, self.metrics = leader, decode, eos_ids, metrics
        self.max_batch = leader.max_batch
        self.requests: queue.Queue[GenerationRequest] = queue.Queue()
        self.stopping = threading.Event()
        self.waiting: list[GenerationRequest] = []  # taken from the queue, not admitted yet (arrival order)
        self.active: dict[int, _Active] = {}  # slot -> request
        self.max_batch_seen = 0  # the largest decode step so far (rows)

    def submit(self, request: GenerationRequest) -> None:
        self.requests.put(request)
        self.metrics.set_queue(self.requests.qsize() + len(self.waiting), len(self.active))

    def run(self, heartbeat_s: float = 1.0) -> None:
        """Serve until `stopping` is set; then tell the followers to leave. A failed collective (a peer died)
        propagates: the caller stops the server."""
        while not self.stopping.is_set():
            if not self.active and not self.waiting:
                try:  # nothing to decode: block for a request (a heartbeat while none comes)
                    self.waiting.append(self.requests.get(timeout=heartbeat_s))
                except queue.Empty:
                    self.leader.idle()  # keeps the followers' broadcast from timing out; notices a dead peer
                    continue
            self._admit()
            if self.active:
                self._step()
            self.metrics.set_queue(self.requests.qsize() + len(self.waiting), len(self.active))
        self.leader.shutdown()

    def _admit(self) -> None:
        while True:
            try:
                self.waiting.append(self.requests.get_nowait())
            except queue.Empty:
                break
        free = [s for s in range(self.max_batch) if s not in self.active]
        admitted, self.waiting = self.waiting[: len(free)], self.waiting[len(free) :]
        for req, slot in zip(admitted, free, strict=False):
            if req.cancelled.is_set():
                self.metrics.request_done("cancelled")
                continue
            seed = req.seed if req.seed is not None else int(torch.seed() % 2**63)
            act = _Active(req, torch.Generator().manual_seed(seed))
            self.active[slot] = act
            sample = req.temperature > 0
            out = self.leader.prefill(slot, req.prompt_ids, sample)
            self._advance(slot, out[0], sample, comm_s=None)

    def _step(self) -> None:
        slots = sorted(self.active)
        tokens = [self.active[s].next_token for s in slots]
        full = any(self.active[s].req.temperature > 0 for s in slots)
        out = self.leader.step(slots, tokens, full)
        timed = self.leader.last_step()
        comm = timed.comm_seconds / len(slots)  # the step's collective time, split among its rows
        self.max_batch_seen = max(self.max_batch_seen, len(slots))
        self.metrics.step(len(slots), timed.seconds, timed.comm_seconds)
        for row, slot in enumerate(slots):
            self._advance(slot, out[row], full, comm_s=comm)

    def _advance(self, slot: int, out: torch.Tensor, full: bool, comm_s: float | None) -> None:
        """Take one new token for the request in `slot`: out is its full logits row [vocab] when `full`, else its
        greedy token id (a 0-d tensor). Retires the request when it is finished."""
        act = self.active[slot]
        req = act.req
        try:  # this request's own failure (e.g. NaN logits): an error for it, the others go on
            token = choose(out, req.temperature, req.top_p, act.gen) if full else int(out)
        except (RuntimeError, ValueError) as exc:
            return self._retire(slot, error=f"choosing token {len(act.tokens) + 1} failed: {exc}")
        now = time.monotonic()
        if token in self.eos_ids:
            return self._retire(slot, "stop")
        act.tokens.append(token)
        latency, ttft = (None, now - req.arrived) if act.last is None else (now - act.last, None)
        self.metrics.token(latency, ttft, comm_s)
        act.last, act.next_token = now, token
        text = self.decode(act.tokens)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._retire(slot, "stop", text[:cut])
        safe = text[: len(text) - _held_back(text, req.stop)]
        if safe.startswith(act.streamed) and len(safe) > len(act.streamed):
            req.sink("text", safe[len(act.streamed) :])
            act.streamed = safe
        if req.cancelled.is_set():
            return self._retire(slot, "cancelled")
        if len(act.tokens) >= req.max_tokens:
            return self._retire(slot, "length")

    def _retire(self, slot: int, finish: str = "", text: str | None = None, error: str | None = None) -> None:
        act = self.active.pop(slot)
        self.leader.release(slot)  # the followers free the slot too
        req = act.req
        if error is not None:
            req.sink("error", error)
            self.metrics.request_done("error")
            return
        text = self.decode(act.tokens) if text is None else text  # a stop string's cut text is final already
        if text.startswith(act.streamed) and len(text) > len(act.streamed):
            req.sink("text", text[len(act.streamed) :])
        req.sink("done", {"text": text, "finish_reason": finish, "prompt_tokens": int(req.prompt_ids.shape[1]),
                          "completion_tokens": len(act.tokens)})  # fmt: skip
        self.metrics.request_done("cancelled" if finish == "cancelled" else "ok")
