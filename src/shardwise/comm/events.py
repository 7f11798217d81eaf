"""What observers (the profiler) see of communication and compute, and the one choke point every
collective passes through.

    CollectiveEvent   op, bytes, time, layer tag, phase; for async ops the exposed and in-flight time
    ComputeEvent      a layer's forward or backward compute time
    add_observer / remove_observer / observed()
    run_collective    runs a blocking collective, timing it for the observers (CUDA events on GPU)
    issue_async       starts an async collective; its Pending reports when waited on
    timed_compute     fn(x, ...) with its forward and backward time reported

With no observer every function here is a plain call: profiling costs nothing when off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..mesh import Mesh

__all__ = ["CollectiveEvent", "ComputeEvent", "Pending", "add_observer", "emit", "issue_async", "now", "observed",
           "remove_observer", "run_collective", "timed_compute"]  # fmt: skip

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
    # Async ops (overlap.py) hold the issuing thread only while issued and waited on: for them `seconds` is
    # that exposed time (issue + wait), `wait_s` the wait alone, `inflight_s` issue to done as that thread
    # saw it (so inflight_s - seconds was hidden behind compute). Blocking ops: all of `seconds` is exposed.
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


_observers: list[Callable[[CollectiveEvent | ComputeEvent], None]] = []


def add_observer(observer: Callable[[CollectiveEvent], None]) -> None:
    _observers.append(observer)


def remove_observer(observer: Callable[[CollectiveEvent], None]) -> None:
    _observers.remove(observer)


def observed() -> bool:
    """Whether anyone listens: callers skip their timing work when not."""
    return bool(_observers)


def run_collective(op: str, numel: int, tensor: torch.Tensor, mesh: Mesh, tag: str, phase: str, run) -> None:
    if not _observers:
        run()
        return
    start = time.perf_counter()
    timing = None
    if tensor.is_cuda:
        # CUDA events on the compute stream: the time it waited on the collective, without draining the
        # GPU after every op (which would serialise what the profiler is meant to observe).
        timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        timing[0].record()
        run()
        timing[1].record()
        seconds = None
    else:
        run()
        seconds = time.perf_counter() - start
    emit(CollectiveEvent(op=op, group_size=mesh.tp_size, numel=numel, nbytes=numel * tensor.element_size(),
                          dtype=tensor.dtype, seconds=seconds, tag=tag, phase=phase, start=start,
                          cuda_events=timing))  # fmt: skip


class Pending:
    """An async collective in flight (from `issue_async`). `wait()` blocks until it is done, reports
    it to the observers and returns `tensor`, its result, which must not be read before."""

    __slots__ = ("tensor", "_work", "_report")

    def __init__(self, work, tensor: torch.Tensor, report: tuple | None):
        self.tensor, self._work, self._report = tensor, work, report

    def wait(self) -> torch.Tensor:
        if self._report is None:  # nobody observing: nothing to time
            self._work.wait()
            return self.tensor
        op, numel, source, mesh, tag, phase, start, issue_s = self._report
        timing = None
        if source.is_cuda:  # the compute stream's stall in wait(), as for blocking ops
            timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[0].record()
        begin = time.perf_counter()
        self._work.wait()
        done = time.perf_counter()
        if timing is not None:
            timing[1].record()
        wait_s = None if timing else done - begin
        seconds = None if timing else issue_s + wait_s
        emit(CollectiveEvent(op=op, group_size=mesh.tp_size, numel=numel, nbytes=numel * source.element_size(),
                              dtype=source.dtype, seconds=seconds, tag=tag, phase=phase,
                              start=start, cuda_events=timing, wait_s=wait_s, inflight_s=done - start,
                              async_op=True))  # fmt: skip
        return self.tensor


def issue_async(op: str, numel: int, tensor: torch.Tensor, out: torch.Tensor, mesh: Mesh, tag: str,
                      phase: str, issue) -> Pending:  # fmt: skip
    """The async sibling of `run_collective`: `issue()` starts the op (async_op=True) and returns its work;
    the observers hear of it when the returned Pending is waited on, with the exposed time."""
    if not _observers:
        return Pending(issue(), out, None)
    start = time.perf_counter()
    work = issue()
    return Pending(work, out, (op, numel, tensor, mesh, tag, phase, start, time.perf_counter() - start))


def now(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def emit(event) -> None:
    for observer in _observers:
        observer(event)


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
    observers this is a plain call: profiling costs nothing when off."""
    if not _observers:
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


