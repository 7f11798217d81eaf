"""Serving metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Updated from the engine thread and read from the HTTP thread: one lock guards them."""

from __future__ import annotations

import threading
import time

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COMM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Histogram:
    """Cumulative buckets (seconds), sum and count, as Prometheus histograms are; also keeps the last
    10,000 observations for the p50/p99 a human wants to read."""

    def __init__(self, buckets=_LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0
        self.recent: list[float] = []

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1
        self.recent.append(value)
        del self.recent[:-10000]

    def quantile(self, q: float) -> float:
        if not self.recent:
            return float("nan")
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model: str, tp: int):
        self.lock = threading.Lock()
        self.labels = f'model="{model}",tp="{tp}"'
        self.requests: dict[str, int] = {}  # outcome -> count (ok | error | cancelled)
        self.tokens = 0
        self.ttft = Histogram()  # request arrival -> first token, seconds
        self.token_latency = Histogram()  # between consecutive tokens of a request, seconds
        self.comm_per_token = Histogram(_COMM_BUCKETS)  # a decode step's collective seconds / its rows (rank 0)
        self.queue_length = 0  # requests waiting for a slot
        self.active = 0  # requests in slots (the batch the next decode step runs)
        self.batch_size = Histogram(_BATCH_BUCKETS)  # rows per decode step
        self.step_seconds = Histogram()  # wall time of one decode step (all its rows), rank 0
        self.step_comm = Histogram(_COMM_BUCKETS)  # the part of it inside collectives: compute = step - comm
        self.started = time.monotonic()
        self._recent_tokens: list[float] = []  # monotonic stamps of the last minute's tokens

    def request_done(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def set_queue(self, waiting: int, active: int) -> None:
        with self.lock:
            self.queue_length, self.active = waiting, active

    def step(self, rows: int, seconds: float = 0.0, comm_s: float = 0.0) -> None:
        with self.lock:
            self.batch_size.observe(rows)
            self.step_seconds.observe(seconds)
            self.step_comm.observe(comm_s)

    def token(self, latency: float | None, ttft: float | None, comm_s: float | None) -> None:
        """One token of a request: latency since its previous token (None for its first), time to first token
        (only for its first), comm seconds attributed to it (None for a prefill's token)."""
        with self.lock:
            self.tokens += 1
            now = time.monotonic()
            self._recent_tokens.append(now)
            while self._recent_tokens and self._recent_tokens[0] < now - 60:
                self._recent_tokens.pop(0)
            if ttft is not None:
                self.ttft.observe(ttft)
            if latency is not None:
                self.token_latency.observe(latency)
            if comm_s is not None:
                self.comm_per_token.observe(comm_s)

    def tokens_per_second(self) -> float:
        """Tokens over the last minute (or since start, if shorter) per second."""
        window = min(60.0, max(time.monotonic() - self.started, 1e-9))
        return len(self._recent_tokens) / window

    def render(self) -> str:
        with self.lock:
            p = "shardwise_serve_"
            lines = [f"# HELP {p}requests_total Requests finished, by outcome.", f"# TYPE {p}requests_total counter"]
            for outcome, n in sorted(self.requests.items()) or [("ok", 0)]:
                lines.append(f'{p}requests_total{{{self.labels},outcome="{outcome}"}} {n}')
            name = f"{p}tokens_generated_total"
            lines += [f"# HELP {name} Tokens generated.", f"# TYPE {name} counter",
                      f"{name}{{{self.labels}}} {self.tokens}"]  # fmt: skip
            for name, hist, text in (
                ("time_to_first_token_seconds", self.ttft, "Request arrival to its first token."),
                ("token_latency_seconds", self.token_latency, "Time between a request's consecutive tokens."),
                (
                    "comm_seconds_per_token",
                    self.comm_per_token,
                    "A decode step's collective time (rank 0) divided among its rows.",
                ),
                ("batch_size", self.batch_size, "Rows (requests) per decode step."),
                ("decode_step_seconds", self.step_seconds, "Wall time of one decode step (rank 0)."),
                ("decode_step_comm_seconds", self.step_comm, "Collective time in one decode step (rank 0)."),
            ):
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} histogram"]
                lines += [_label(line, self.labels) for line in hist.lines(p + name)]
            for name, value, text in (
                ("tokens_per_second", self.tokens_per_second(), "Tokens per second over the last minute."),
                ("queue_length", self.queue_length, "Requests waiting for a batch slot."),
                ("active_requests", self.active, "Requests in batch slots (being decoded)."),
                ("token_latency_p50_seconds", self.token_latency.quantile(0.5), "Median per-token latency."),
                ("token_latency_p99_seconds", self.token_latency.quantile(0.99), "p99 per-token latency."),
                ("time_to_first_token_p50_seconds", self.ttft.quantile(0.5), "Median time to first token."),
                ("time_to_first_token_p99_seconds", self.ttft.quantile(0.99), "p99 time to first token."),
                ("comm_seconds_per_token_p50", self.comm_per_token.quantile(0.5), "Median comm seconds per token."),
            ):
                value = "NaN" if value != value else value  # Prometheus spells it NaN
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} gauge", f"{p}{name}{{{self.labels}}} {value}"]
        return "\n".join(lines) + "\n"


def _label(line: str, labels: str) -> str:
    """Add the common labels to one sample line of a histogram."""
    name, value = line.rsplit(" ", 1)
    if name.endswith("}"):
        return f"{name[:-1]},{labels}}} {value}"
    return f"{name}{{{labels}}} {value}"
