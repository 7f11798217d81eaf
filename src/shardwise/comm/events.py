"""What observers (the profiler, the demo's narrator) see of communication and compute, and the one choke
point every collective, blocking or async, passes through.

    CollectiveStart   a collective was issued: op, bytes, layer tag, phase (only to observers that ask)
    CollectiveEvent   a collective finished: op, bytes, time, layer tag, phase; for async ops the exposed
                      and in-flight time
    ComputeEvent      a layer's forward or backward compute time
    add_observer(fn, starts=False) / remove_observer(fn) / observed()
    run_collective    issues a collective, blocking (timed around it) or async (a Pending, timed when waited)
    timed_compute     fn(x, ...) with its forward and backward time reported
    now / emit        a clock that waits for the device; hand an event to every observer

With no observer every function here is a plain call: profiling costs nothing when off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import checks

__all__ = ["CollectiveEvent", "CollectiveStart", "ComputeEvent", "Pending", "add_observer", "before", "emit", "now",
           "observed", "remove_observer", "run_collective", "timed_compute"]  # fmt: skip


@dataclass(frozen=True)
class CollectiveStart:
    """A collective has been issued (the finish comes later as a CollectiveEvent with the same fields)."""

    op: str
    group_size: int
    numel: int
    nbytes: int
    tag: str
    phase: str
    start: float  # time.perf_counter() when it was issued
    async_op: bool = False


@dataclass(frozen=True)
class CollectiveEvent:
    op: str  # all_reduce | all_gather | reduce_scatter
    group_size: int
    numel: int  # elements of the full (unsharded) tensor the op moves: b*s*h for the block's ops
    nbytes: int
    dtype: torch.dtype
    seconds: float | None  # None until resolve() on CUDA, where the time comes from CUDA events
    tag: str  # name of the layer that issued it
    phase: str  # fwd | bwd
    start: float = 0.0  # time.perf_counter() when it was issued
    cuda_events: tuple | None = None
    # Async ops hold the issuing thread only while issued and waited on: for them `seconds` is that exposed
    # time (issue + wait), `wait_s` the wait alone, `inflight_s` issue to done as that thread saw it (so
    # inflight_s - seconds was hidden behind compute). Blocking ops: all of `seconds` is exposed.
    wait_s: float | None = None
    inflight_s: float | None = None
    async_op: bool = False

    def resolve(self) -> CollectiveEvent:
        """The event with its time filled in (waits for the GPU to reach the end event)."""
        if self.seconds is not None or self.cuda_events is None:
            return self
        begin, end = self.cuda_events
        end.synchronize()
        seconds = begin.elapsed_time(end) / 1e3
        wait_s = seconds if self.async_op else self.wait_s  # async on CUDA: the stream's stall in wait()
        return replace(self, seconds=seconds, wait_s=wait_s, cuda_events=None)


@dataclass(frozen=True)
class ComputeEvent:
    tag: str
    phase: str  # fwd | bwd
    seconds: float
    start: float = 0.0


Observer = Callable[[CollectiveStart | CollectiveEvent | ComputeEvent], None]
_observers: list[Observer] = []
_start_observers: list[Observer] = []  # the subset that also wants CollectiveStart


def add_observer(observer: Observer, *, starts: bool = False) -> None:
    """observer(event) for every CollectiveEvent and ComputeEvent; with starts=True also a CollectiveStart
    when each collective is issued (the demo's narrator; the profiler does not need them)."""
    _observers.append(observer)
    if starts:
        _start_observers.append(observer)


def remove_observer(observer: Observer) -> None:
    _observers.remove(observer)
    if observer in _start_observers:
        _start_observers.remove(observer)


def observed() -> bool:
    """Whether anyone listens: callers skip their timing work when not."""
    return bool(_observers)


def emit(event) -> None:
    for observer in _start_observers if isinstance(event, CollectiveStart) else _observers:
        observer(event)


def now(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


class _Stopwatch:
    """Time spent by the issuing thread: wall clock on CPU; on CUDA two events on the compute stream, read
    at resolve() (the time the stream waited, without draining the GPU after every op, which would
    serialise what the profiler is meant to observe)."""

    __slots__ = ("begin", "events", "seconds")

    def __init__(self, tensor: torch.Tensor):
        self.events = None
        if tensor.is_cuda:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.begin = time.perf_counter()

    def stop(self) -> float:
        """Wall seconds since start (the CPU-side time); on CUDA the events hold the stream's time."""
        self.seconds = time.perf_counter() - self.begin
        if self.events is not None:
            self.events[1].record()
        return self.seconds


@dataclass(frozen=True)
class _Issue:
    """What an observer is told about one collective, known when it is issued."""

    op: str
    numel: int
    source: torch.Tensor
    group_size: int
    tag: str
    phase: str
    start: float

    def finished(self, watch: _Stopwatch, **async_times) -> CollectiveEvent:
        exposed = watch.seconds + async_times.pop("issue_s", 0.0)  # async: the issue's time too
        return CollectiveEvent(op=self.op, group_size=self.group_size, numel=self.numel,
                               nbytes=self.numel * self.source.element_size(), dtype=self.source.dtype,
                               seconds=None if watch.events is not None else exposed,
                               tag=self.tag, phase=self.phase, start=self.start,
                               cuda_events=watch.events, **async_times)  # fmt: skip


class Pending:
    """An async collective in flight (`run_collective(..., async_op=True)`). `wait()` blocks until it is done,
    reports it to the observers and returns `tensor`, its result, which must not be read before."""

    __slots__ = ("tensor", "_work", "_issue", "_issue_s")

    def __init__(self, work, tensor: torch.Tensor, issue: _Issue | None, issue_s: float = 0.0):
        self.tensor, self._work, self._issue, self._issue_s = tensor, work, issue, issue_s

    def wait(self) -> torch.Tensor:
        if self._issue is None:  # nobody observing: nothing to time
            self._work.wait()
            return self.tensor
        watch = _Stopwatch(self._issue.source)  # the stall in wait(), as for blocking ops
        self._work.wait()
        wait_s = watch.stop()
        done = time.perf_counter()
        emit(self._issue.finished(watch, issue_s=self._issue_s, wait_s=None if watch.events else wait_s,
                                  inflight_s=done - self._issue.start, async_op=True))  # fmt: skip
        return self.tensor


def before(op: str, source: torch.Tensor, group, group_size: int, tag: str, phase: str, *, check_shape: bool,
           debug: bool, shape: tuple[int, ...] | None = None) -> str | None:
    """checks.before (the ranks agree before `op`), reported to observers as the collective it is: tag
    "<tag>:shape_check" (an all-gather of one int64 row per rank) or "<tag>:debug_check", so the profiler counts
    its time as communication of that layer rather than compute (one ~0.4-1.3 ms gloo call per checked op)."""
    start = time.perf_counter()
    kind = checks.before(op, source, group, group_size, tag, phase, check_shape=check_shape, debug=debug, shape=shape)
    if kind is not None and _observers:
        numel = checks.SHAPE_ROW_NUMEL * group_size if kind == "shape_check" else 0
        emit(CollectiveEvent(op="all_gather", group_size=group_size, numel=numel, nbytes=numel * 8, dtype=torch.int64,
                             seconds=time.perf_counter() - start, tag=f"{tag}:{kind}", phase=phase, start=start))
    return kind


def run_collective(op: str, numel: int, source: torch.Tensor, result: torch.Tensor, group_size: int, tag: str,
                   phase: str, issue: Callable[[bool], object], async_op: bool = False, *, group=None,
                   check_shape: bool = False, debug: bool = False):  # fmt: skip
    """The choke point. `issue(async_op)` calls torch.distributed (returning its work when async); `result`
    is the tensor that holds the outcome. Blocking: runs it, reports it, returns `result`. Async: returns a
    Pending whose wait() reports it (with the exposed time: issue + wait). `numel` is what the op moves
    (the full tensor), `source` the input whose dtype gives the bytes.

    Before issuing, the ranks of `group` agree (checks.before): with `debug` (or SHARDWISE_DEBUG_COLLECTIVES=1) on
    a fingerprint of the op, shape included; else with `check_shape` on source's shape."""
    before(op, source, group, group_size, tag, phase, check_shape=check_shape, debug=debug)
    if not _observers:
        work = issue(async_op)
        return Pending(work, result, None) if async_op else result
    info = _Issue(op, numel, source, group_size, tag, phase, time.perf_counter())
    if _start_observers:
        emit(CollectiveStart(op, group_size, numel, numel * source.element_size(), tag, phase, info.start, async_op))
    watch = _Stopwatch(source)
    work = issue(async_op)
    if async_op:
        return Pending(work, result, info, watch.stop())
    watch.stop()
    emit(info.finished(watch))
    return result


class _SpanEnd(torch.autograd.Function):
    """Marks a layer's output: its backward runs first in the layer's backward, so it opens the span."""

    @staticmethod
    def forward(ctx, y, span):
        ctx.span = span
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.span["bwd_start"] = now(grad)
        return grad, None


class _SpanStart(torch.autograd.Function):
    """Marks a layer's input: its backward runs last in the layer's backward, so it closes the span."""

    @staticmethod
    def forward(ctx, x, span):
        ctx.span = span
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        span = ctx.span
        if "bwd_start" in span:
            begin = span.pop("bwd_start")
            emit(ComputeEvent(span["tag"], "bwd", now(grad) - begin, begin))
        return grad, None


def timed_compute(tag: str, fn, x: torch.Tensor, *args):
    """fn(x, *args), reporting its forward and backward time to the observers, if any. Without
    observers this is a plain call: profiling costs nothing when off. Under torch.compile too: the host clock
    cannot be traced (the profiler times eager runs; compiled collectives report nothing either)."""
    if not _observers or torch.compiler.is_compiling():
        return fn(x, *args)
    span = {"tag": tag}
    if x.requires_grad:
        x = _SpanStart.apply(x, span)
    elif args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        # e.g. the first layer, whose input needs no grad: the weight's grad closes the span instead
        args = (_SpanStart.apply(args[0], span), *args[1:])
    start = now(x)
    y = fn(x, *args)
    emit(ComputeEvent(tag, "fwd", now(y) - start, start))
    return _SpanEnd.apply(y, span) if y.requires_grad else y
