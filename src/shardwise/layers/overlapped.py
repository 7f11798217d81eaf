"""Communication hidden behind compute in the parallel linear layers (`overlap=True`, `chunks=k`): the
autograd behind `column_overlapped` / `row_overlapped`, which layers/linear.py calls with explicit weights and
a LinearOptions record. The collectives are comm's own primitives with async_op=True (one choke point).

    column, backward     dx's all-reduce (SP: reduce-scatter) runs while dW and db are computed; with chunks,
                         dx is computed chunk by chunk, chunk i's collective in flight during chunk i+1's dx
                         (the last one during dW)
    column, SP forward   the tokens are all-gathered chunk by chunk, chunk i+1 in flight while chunk i is
                         multiplied; the gathered input is saved for backward (never gathered again)
    row, forward         the partial output is computed chunk by chunk, chunk i reduce-scattered (without SP:
                         all-reduced) while chunk i+1 is computed
    row, SP backward     the output grad is all-gathered chunk by chunk, chunk i+1 in flight while chunk i's
                         dx is computed; then dW

With chunks=1 the row layer's forward and SP backward, and the column layer's SP forward, have nothing to hide
their collective behind. dW is one matmul over all tokens, as without overlap (the same sums in the same
order); chunks only split rows, so outputs and grads match the non-overlapped layer's to fp32 rounding.

Layout under sequence parallelism: rank r holds tokens [r*n, (r+1)*n) of the sequence (n = s/tp). Chunk c is
rows [off_c, off_c + n_c) of every rank's segment; gathering chunk c yields them rank-major, which is how those
rows sit in a [tp, n, ...] view of the full sequence, so `_rows` and `_put` below are all the bookkeeping.
Chunk sizes differ by at most one (the first n % k are longer).

SHARDWISE_CHECK_ASYNC=1: every handle asserts that its result is read only after wait(), that it is waited
once, and that the layer call (an autograd forward or backward) waited on everything it issued. A reduce-scatter
that writes into a slice of a bigger tensor (dx, y) writes into a private buffer instead, copied there at wait();
the slice holds NaN until then, so code that reads it early computes NaN (a failed comparison) instead of a
result that is right whenever the collective happened to finish first. Unset, the handles are comm.Pending
themselves: one environment lookup per layer call.

Shapes: under sequence parallelism the ranks' token counts must agree; each layer call checks its input's shape
once (Inflight.check_tokens: one small all-gather) and its chunks' collectives skip their own check.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import comm
from ..comm import ComputeEvent, Pending
from ..mesh import Mesh

# ---- checked handles --------------------------------------------------------------------------------


def checking() -> bool:
    return os.environ.get("SHARDWISE_CHECK_ASYNC") == "1"


class CheckedHandle:
    """A Pending that asserts it is used right: result read after wait(), waited exactly once. With `dest`, the
    collective wrote into a private buffer: wait() copies it into `dest` (NaN until then) and returns `dest`."""

    __slots__ = ("_pending", "dest", "op", "tag", "waited")

    def __init__(self, pending: Pending, op: str, tag: str, dest: torch.Tensor | None = None):
        self._pending, self.op, self.tag, self.waited, self.dest = pending, op, tag, False, dest

    @property
    def tensor(self) -> torch.Tensor:
        assert self.waited, f"{self.op} issued by {self.tag}: its result was read before wait()"
        return self._pending.tensor if self.dest is None else self.dest

    def wait(self) -> torch.Tensor:
        assert not self.waited, f"{self.op} issued by {self.tag}: waited twice"
        self.waited = True
        result = self._pending.wait()
        if self.dest is None:
            return result
        self.dest.copy_(result)
        return self.dest


class Inflight:
    """The async collectives of one layer call (an autograd forward or backward): issues them with comm's
    primitives (async_op=True), checks them when SHARDWISE_CHECK_ASYNC=1, and, when the profiler observes, reports
    the call's compute time (its span less the time the thread was held by collectives).

        with Inflight(mesh, tag, "bwd", x) as comms:
            h = comms.all_reduce(dx)
            ...compute...
            dx = comms.wait(h)
    """

    def __init__(self, mesh: Mesh, tag: str, phase: str, like: torch.Tensor):
        self.mesh, self.tag, self.phase = mesh, tag, phase
        self.handles = [] if checking() else None
        self.observed = comm.observed()
        if self.observed:
            self.like, self.held = like, 0.0
            self.start = comm.now(like)

    def __enter__(self) -> Inflight:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return  # the error that got us here is the one to see
        for h in self.handles or ():
            assert h.waited, f"{h.op} issued by {self.tag} ({self.phase}) was never waited on"
        if self.observed:
            end = comm.now(self.like)
            comm.emit(ComputeEvent(self.tag, self.phase, end - self.start - self.held, self.start))

    def _track(self, op: str, issue, dest: torch.Tensor | None = None):
        """issue() -> a Pending from comm's async primitives; the time it held this thread is not compute.
        `dest`: where the result must land (check mode: issue() wrote into a private buffer)."""
        t0 = time.perf_counter()
        pending = issue()
        if self.observed:
            self.held += time.perf_counter() - t0
        if self.handles is None:
            return pending
        handle = CheckedHandle(pending, op, self.tag, dest)
        self.handles.append(handle)
        return handle

    def wait(self, handle) -> torch.Tensor:
        if not self.observed:
            return handle.wait()
        t0 = time.perf_counter()
        out = handle.wait()
        self.held += time.perf_counter() - t0
        return out

    def check_tokens(self, x: torch.Tensor, op: str) -> None:
        """Every rank's x: [s, ..., features] has the same token dims (all but the last, which may be an uneven
        shard), or a ValueError on every rank: before any chunk is issued, as ranks with different token counts
        would issue different numbers of chunks."""
        comm.before(op, x, self.mesh.tp_group, self.mesh.tp_size, self.tag, self.phase, check_shape=True,
                    debug=self.mesh.debug, shape=x.shape[:-1])  # fmt: skip

    def all_reduce(self, x: torch.Tensor):
        """Sum over the tp ranks, in place; the handle's result is x (made contiguous)."""
        return self._track("all_reduce", lambda: comm.all_reduce_(x, self.mesh, self.tag, self.phase, async_op=True))

    def all_gather(self, x: torch.Tensor):
        """[n, ...] on each rank -> [tp * n, ...] in rank order."""
        issue = lambda: comm.all_gather(x, 0, self.mesh, self.tag, self.phase, async_op=True, check_shape=False)  # noqa: E731
        return self._track("all_gather", issue)

    def reduce_scatter(self, x: torch.Tensor, out: torch.Tensor):
        """[tp * n, ...] partial sums -> this rank's [n, ...] of the total, written into `out` (contiguous)."""
        dest = None
        if self.handles is not None:  # check mode: out stays NaN until wait() copies the result in
            dest, out = out, torch.empty_like(out, memory_format=torch.contiguous_format)
            dest.fill_(float("nan"))
        issue = lambda: comm.reduce_scatter(x, self.mesh, self.tag, self.phase, out=out, async_op=True,  # noqa: E731
                                            check_shape=False)  # fmt: skip
        return self._track("reduce_scatter", issue, dest)


# ---- chunk bookkeeping ------------------------------------------------------------------------------


def chunk_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """(offset, size) of k chunks of n rows, sizes differing by at most one; fewer chunks if n < k."""
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    bounds, offset = [], 0
    for c in range(k):
        size = base + (c < extra)
        bounds.append((offset, size))
        offset += size
    return bounds


def _rows(full: torch.Tensor, tp: int, offset: int, size: int) -> torch.Tensor:
    """Rows [offset, offset+size) of every rank's segment of `full` [tp*n, ...], rank-major: [tp*size, ...]."""
    n = full.shape[0] // tp
    if size == n:
        return full
    return full.view(tp, n, *full.shape[1:])[:, offset : offset + size].reshape(tp * size, *full.shape[1:])


def _put(full: torch.Tensor, tp: int, offset: int, part: torch.Tensor) -> None:
    """The inverse of _rows: write part [tp*size, ...] into those rows of full [tp*n, ...]."""
    n, size = full.shape[0] // tp, part.shape[0] // tp
    full.view(tp, n, *full.shape[1:])[:, offset : offset + size] = part.view(tp, size, *part.shape[1:])


def _weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T x summed over every leading dim, as F.linear's backward computes it."""
    return g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


@dataclass(frozen=True)
class LinearOptions:
    """What the overlapped autograd needs of a layer besides its weights: built by the layer at each call
    (the profiler renames tags after construction)."""

    mesh: Mesh
    tag: str
    sequence_parallel: bool
    chunks: int


def _check_tokens(s: int, tp: int) -> None:
    if s % tp:
        raise ValueError(
            f"sequence parallelism splits dim 0 ({s} tokens) across tp={tp} ranks; "
            f"use a sequence length that is a multiple of {tp}"
        )


# ---- column-parallel: one input, one or more projections ------------------------------------------------


class _ColumnLinear(torch.autograd.Function):
    """ys_j = x W_j^T + b_j for projections j sharing one input (params: w0, b0, w1, b1, ...), the input's
    communication overlapped. Without SP x is replicated (the forward has no communication); with SP x is
    this rank's tokens and the outputs cover the whole sequence."""

    @staticmethod
    def forward(ctx, x, opts: LinearOptions, *params):
        weights, biases = params[0::2], params[1::2]
        tp = opts.mesh.tp_size
        bounds = chunk_bounds(x.shape[0], opts.chunks)
        with Inflight(opts.mesh, opts.tag, "fwd", x) as comms:
            if opts.sequence_parallel:
                comms.check_tokens(x, "all_gather")
            if not opts.sequence_parallel:
                full = x
                ys = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
            elif len(bounds) == 1:  # nothing to hide the gather behind
                full = comms.wait(comms.all_gather(x))
                ys = [F.linear(full, w, b) for w, b in zip(weights, biases, strict=True)]
            else:  # chunk c+1 gathered while chunk c is multiplied
                full = x.new_empty((tp * x.shape[0], *x.shape[1:]))
                ys = [x.new_empty((tp * x.shape[0], *x.shape[1:-1], w.shape[0])) for w in weights]
                pending = comms.all_gather(x[: bounds[0][1]])
                for c, (offset, _) in enumerate(bounds):
                    piece = comms.wait(pending)
                    if c + 1 < len(bounds):
                        start, size = bounds[c + 1]
                        pending = comms.all_gather(x[start : start + size])
                    _put(full, tp, offset, piece)
                    for y, w, b in zip(ys, weights, biases, strict=True):
                        _put(y, tp, offset, F.linear(piece, w, b))
        ctx.opts, ctx.bounds, ctx.x_shape = opts, bounds, x.shape
        ctx.set_materialize_grads(False)  # an unused projection's grad stays None and is skipped
        ctx.save_for_backward(full, *weights)  # the gathered input, kept: backward never gathers again
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        opts, bounds = ctx.opts, ctx.bounds
        tp, sp = opts.mesh.tp_size, opts.sequence_parallel
        full, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad  # x, opts, w0, b0, w1, b1, ...
        some_grad = next(g for g in grads if g is not None)
        dx = some_grad.new_empty(ctx.x_shape) if needs[0] and (sp or len(bounds) > 1) else None
        with Inflight(opts.mesh, opts.tag, "bwd", some_grad) as comms:
            inflight = None  # (handle, offset) of the chunk whose dx collective is in flight
            for offset, size in bounds if needs[0] else ():
                # this chunk's dx (summed over the projections) while the previous chunk's is reduced
                dxc = None
                for g, w in zip(grads, weights, strict=True):
                    if g is not None:
                        gc = _rows(g, tp, offset, size) if sp else g[offset : offset + size]
                        dxc = gc.matmul(w) if dxc is None else dxc.add_(gc.matmul(w))
                if inflight is not None:
                    dx = _land(comms, *inflight, dx, sp)
                if sp:  # reduce-scattered straight into this rank's rows of dx
                    inflight = comms.reduce_scatter(dxc, dx[offset : offset + size]), offset
                else:
                    inflight = comms.all_reduce(dxc), offset
            # meanwhile the weight and bias grads, one matmul over all tokens each: the same sums in the same
            # order as without overlap
            out = [None, None]
            for j, g in enumerate(grads):
                out.append(_weight_grad(g, full) if g is not None and needs[2 + 2 * j] else None)
                out.append(g.reshape(-1, g.shape[-1]).sum(0) if g is not None and needs[3 + 2 * j] else None)
            if inflight is not None:
                out[0] = _land(comms, *inflight, dx, sp)
        return tuple(out)


def _land(comms: Inflight, handle, offset: int, dx: torch.Tensor | None, sp: bool) -> torch.Tensor:
    """Wait for one chunk's dx collective and put the result in dx (reduce-scatters wrote there already)."""
    result = comms.wait(handle)
    if sp:
        return dx
    if dx is None:  # a single chunk: the all-reduced buffer is dx
        return result
    dx[offset : offset + result.shape[0]] = result
    return dx


# ---- row-parallel ------------------------------------------------------------------------------------


class _RowLinear(torch.autograd.Function):
    """Partial sums x W^T (x: [s, ..., in/tp]) reduced over the tp ranks, chunk i's collective in flight
    while chunk i+1 is computed: all-reduced to [s, ..., out], or with SP reduce-scattered to this rank's
    tokens [s/tp, ..., out]. The bias is the caller's (added once, after the reduction)."""

    @staticmethod
    def forward(ctx, x, opts: LinearOptions, weight):
        tp, sp = opts.mesh.tp_size, opts.sequence_parallel
        with Inflight(opts.mesh, opts.tag, "fwd", x) as comms:
            if sp:  # the same shape everywhere first, so that a bad token count raises on every rank
                comms.check_tokens(x, "reduce_scatter")
                _check_tokens(x.shape[0], tp)
            n = x.shape[0] // tp if sp else x.shape[0]
            bounds = chunk_bounds(n, opts.chunks)
            y = x.new_empty((n, *x.shape[1:-1], weight.shape[0])) if sp or len(bounds) > 1 else None
            inflight = None
            for offset, size in bounds:
                z = F.linear(_rows(x, tp, offset, size) if sp else x[offset : offset + size], weight)
                if inflight is not None:
                    y = _land(comms, *inflight, y, sp)
                if sp:
                    inflight = comms.reduce_scatter(z, y[offset : offset + size]), offset
                else:
                    inflight = comms.all_reduce(z), offset
            y = _land(comms, *inflight, y, sp)
        ctx.opts, ctx.bounds = opts, bounds
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        opts, bounds = ctx.opts, ctx.bounds
        x, weight = ctx.saved_tensors
        need_dx, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not opts.sequence_parallel:  # the grad is replicated: no communication at all
            with Inflight(opts.mesh, opts.tag, "bwd", g):  # (reports the compute time to the profiler)
                dx = g.matmul(weight) if need_dx else None
                return dx, None, _weight_grad(g, x) if need_w else None
        tp, chunked = opts.mesh.tp_size, len(bounds) > 1
        dx = g.new_empty((*x.shape[:-1], weight.shape[1])) if need_dx and chunked else None
        full = g.new_empty((tp * g.shape[0], *g.shape[1:])) if chunked else None
        with Inflight(opts.mesh, opts.tag, "bwd", g) as comms:
            pending = comms.all_gather(g[: bounds[0][1]])
            for c, (offset, _) in enumerate(bounds):
                gc = comms.wait(pending)  # [tp*size, ..., out]: this chunk's rows of every rank
                if c + 1 < len(bounds):  # the next chunk flies while this one's dx is computed
                    start, size = bounds[c + 1]
                    pending = comms.all_gather(g[start : start + size])
                if not chunked:
                    full, dx = gc, gc.matmul(weight) if need_dx else None
                    continue
                _put(full, tp, offset, gc)
                if need_dx:
                    _put(dx, tp, offset, gc.matmul(weight))
        # one matmul over the whole gathered grad: the same sums in the same order as without overlap
        return dx, None, _weight_grad(full, x) if need_w else None


# ---- entry points (layers/linear.py calls these for overlap=True at tp > 1) ---------------------------


def column_overlapped(x: torch.Tensor, opts: LinearOptions, weights, biases) -> tuple[torch.Tensor, ...]:
    """ys_j = x W_j^T + b_j for column-parallel projections sharing one input, the input's communication
    overlapped: one all-gather (SP) forward, one dx collective backward. x: [s, ..., in] (SP: [s/tp, ..., in]),
    weights[j]: [out_j/tp, in], biases[j]: [out_j/tp] or None -> ys[j]: [s, ..., out_j/tp]."""
    params = [p for pair in zip(weights, biases, strict=True) for p in pair]
    return _ColumnLinear.apply(x, opts, *params)


def row_overlapped(x: torch.Tensor, opts: LinearOptions, weight: torch.Tensor) -> torch.Tensor:
    """Row-parallel partial sums x W^T reduced over tp, the reduction overlapped with the matmul chunks (no
    bias: the caller adds it once). x: [s, ..., in/tp], weight: [out, in/tp] -> [s, ..., out] (SP: [s/tp, ...])."""
    return _RowLinear.apply(x, opts, weight)
