"""Autograd-aware collectives of tensor parallelism, each the dual of another.

    copy_to_tp            fwd identity              bwd all-reduce          (Megatron's f)
    reduce_from_tp        fwd all-reduce            bwd identity            (Megatron's g)
    gather_from_tp        fwd all-gather, last dim  bwd split, last dim
    scatter_to_tp         fwd split, last dim       bwd all-gather, last dim
    gather_from_sp        fwd all-gather, dim 0     bwd reduce-scatter, dim 0   (sequence parallel)
    reduce_scatter_to_sp  fwd reduce-scatter, dim 0 bwd all-gather, dim 0
    scatter_to_sp         fwd split, dim 0          bwd all-gather, dim 0
    copy_params_to_tp     fwd identity              bwd one all-reduce of all the grads (replicated
                          params that see different tokens or heads on each rank)
    sum_grad_over_replicas  fwd identity            bwd sum over the ranks holding the same slice

The primitives under them (all_reduce_, all_gather, reduce_scatter) are blocking or, with async_op=True,
return a Pending (what the overlapped layers use); either way they run through `events.run_collective`, the
one place observers (the profiler) see op, bytes and time. With tp=1 every autograd function returns its
input untouched and issues nothing. Under torch.compile the primitives issue traceable.py's functional
collectives instead (no observers, no shape agreement), so the duals trace, forward and backward, into one graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..mesh import Mesh
from . import traceable
from .events import before, run_collective

__all__ = ["all_gather", "all_reduce_", "copy_params_to_tp", "copy_to_tp", "gather_from_sp", "gather_from_tp",
           "reduce_from_tp", "reduce_scatter", "reduce_scatter_to_sp", "scatter_to_sp", "scatter_to_tp",
           "sum_grad_over_replicas"]  # fmt: skip


# ---- primitives (no autograd): blocking, or async_op=True for a Pending (its wait() gives the result) ----


def _group(mesh: Mesh, group: str):
    """(process group, size) of the mesh dimension `group`: "tp" (every layer) or "dp" (gradient sync)."""
    if group == "tp":
        return mesh.tp_group, mesh.tp_size
    if group == "dp":
        return mesh.dp_group, mesh.dp_size
    raise ValueError(f"group must be 'tp' or 'dp', got {group!r}")


def all_reduce_(x: torch.Tensor, mesh: Mesh, tag: str, phase: str, op=dist.ReduceOp.SUM, *, group: str = "tp",
                async_op: bool = False):  # fmt: skip
    """x: [...] on each rank -> its sum (or `op`) over the `group` ranks, in place (x itself is returned,
    made contiguous first)."""
    pg, size = _group(mesh, group)
    if traceable.compiling():  # functional, then copied back: callers rely on the in-place result
        total = x.copy_(traceable.all_reduce(x, pg, op))
        return traceable.Ready(total) if async_op else total
    x = x.contiguous()
    issue = lambda a: dist.all_reduce(x, op=op, group=pg, async_op=a)  # noqa: E731
    # No shape check: all-reduce inputs come from replicated activations or parameters, never a rank's own tokens.
    return run_collective("all_reduce", x.numel(), x, x, size, tag, phase, issue, async_op, group=pg,
                          debug=mesh.debug)  # fmt: skip


def all_gather(x: torch.Tensor, dim: int, mesh: Mesh, tag: str, phase: str, *, async_op: bool = False,
               check_shape: bool = True):  # fmt: skip
    """x: [..., n, ...] on each rank -> [..., n * tp, ...], rank order along `dim` (async: dim 0 only).
    `check_shape`: first agree that every rank's x has the same shape (a ValueError on every rank if not; gloo
    would abort the process); pass False where the caller knows (a backward mirroring a checked forward)."""
    dim = dim % x.dim()
    if async_op and dim:
        raise ValueError("an async all_gather concatenates along dim 0; move the dim first or use async_op=False")
    if traceable.compiling():
        gathered = traceable.all_gather(x, dim, mesh.tp_group)
        return traceable.Ready(gathered) if async_op else gathered
    x = x.contiguous()
    # The output is the rank-order concatenation along dim 0 (gloo insists on that exact shape).
    out = torch.empty((mesh.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    issue = lambda a: dist.all_gather_single(out, x, group=mesh.tp_group, async_op=a)  # noqa: E731
    result = run_collective("all_gather", out.numel(), x, out, mesh.tp_size, tag, phase, issue, async_op,
                            group=mesh.tp_group, check_shape=check_shape, debug=mesh.debug)  # fmt: skip
    if async_op or dim == 0:
        return result
    return torch.cat(out.view(mesh.tp_size, *x.shape).unbind(0), dim=dim)


def reduce_scatter(x: torch.Tensor, mesh: Mesh, tag: str, phase: str, *, out: torch.Tensor | None = None,
                   async_op: bool = False, check_shape: bool = True):  # fmt: skip
    """x: [n * tp, ...] partial sums on each rank -> [n, ...] this rank's slice of the total (written into
    `out`, contiguous, when given). `check_shape` as for all_gather."""
    if x.shape[0] % mesh.tp_size:
        # Agree first, as run_collective would: a peer whose count divides went on to issue, and must fail too
        # (with the shapes of both); if every rank has this count, every rank raises below. (Compiled: the
        # shapes are the same on every rank's trace, so the error below is raised everywhere.)
        if not traceable.compiling():
            before("reduce_scatter", x, mesh.tp_group, mesh.tp_size, tag, phase, check_shape=True, debug=mesh.debug)
        raise ValueError(
            f"sequence parallelism splits dim 0 ({x.shape[0]} tokens) across tp={mesh.tp_size} ranks; "
            f"use a sequence length that is a multiple of {mesh.tp_size}"
        )
    if traceable.compiling():
        part = traceable.reduce_scatter(x, mesh.tp_group)
        part = part if out is None else out.copy_(part)
        return traceable.Ready(part) if async_op else part
    x = x.contiguous()
    if out is None:
        out = torch.empty((x.shape[0] // mesh.tp_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    # gloo has reduce_scatter_single in torch 2.13 (checked), so no emulation over all_reduce is needed.
    issue = lambda a: dist.reduce_scatter_single(out, x, group=mesh.tp_group, async_op=a)  # noqa: E731
    return run_collective("reduce_scatter", x.numel(), x, out, mesh.tp_size, tag, phase, issue, async_op,
                          group=mesh.tp_group, check_shape=check_shape, debug=mesh.debug)  # fmt: skip


def _gather_last_uneven(x: torch.Tensor, sizes: list[int], mesh: Mesh, tag: str, phase: str) -> torch.Tensor:
    """x: [..., sizes[rank]] -> [..., sum(sizes)]: padded to the largest share, gathered, trimmed."""
    longest = max(sizes)
    if x.shape[-1] < longest:
        x = torch.nn.functional.pad(x, (0, longest - x.shape[-1]))
    padded = all_gather(x, -1, mesh, tag, phase)
    pieces = [padded[..., r * longest : r * longest + n] for r, n in enumerate(sizes)]
    return torch.cat(pieces, dim=-1)


def _split_last_uneven(x: torch.Tensor, sizes: list[int], mesh: Mesh) -> torch.Tensor:
    start = sum(sizes[: mesh.tp_rank])
    return x[..., start : start + sizes[mesh.tp_rank]].contiguous()


def _split(x: torch.Tensor, dim: int, mesh: Mesh) -> torch.Tensor:
    size = x.shape[dim]
    if size % mesh.tp_size:
        raise ValueError(
            f"cannot split dim {dim} of size {size} evenly across tp={mesh.tp_size} ranks; "
            f"make it a multiple of {mesh.tp_size}"
        )
    return x.chunk(mesh.tp_size, dim=dim)[mesh.tp_rank].contiguous()


# ---- autograd pairs ------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag):
        ctx.mesh, ctx.tag = mesh, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Out of place: the incoming grad may be shared with another branch (e.g. a residual add).
        return all_reduce_(grad.clone(), ctx.mesh, ctx.tag, "bwd"), None, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag):
        # In place, as the partial sums are a fresh matmul output nothing else saved; mark_dirty
        # makes autograd raise (instead of silently computing wrong grads) if that is ever untrue.
        # Compiled: out of place (the functional op makes a new tensor; the compiler reuses buffers itself).
        if traceable.compiling():
            return traceable.all_reduce(x, mesh.tp_group)
        if x._is_view() or not x.is_contiguous():
            x = x.clone(memory_format=torch.contiguous_format)
        else:
            ctx.mark_dirty(x)
        return all_reduce_(x, mesh, tag, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag, sizes):
        ctx.mesh, ctx.sizes = mesh, sizes
        if sizes is None:
            return all_gather(x, -1, mesh, tag, "fwd")
        return _gather_last_uneven(x, sizes, mesh, tag, "fwd")

    @staticmethod
    def backward(ctx, grad):
        if ctx.sizes is None:
            return _split(grad, -1, ctx.mesh), None, None, None
        return _split_last_uneven(grad, ctx.sizes, ctx.mesh), None, None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag, sizes):
        ctx.mesh, ctx.tag, ctx.sizes = mesh, tag, sizes
        if sizes is None:
            return _split(x, -1, mesh)
        return _split_last_uneven(x, sizes, mesh)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sizes is None:
            return all_gather(grad, -1, ctx.mesh, ctx.tag, "bwd"), None, None, None
        return _gather_last_uneven(grad, ctx.sizes, ctx.mesh, ctx.tag, "bwd"), None, None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag):
        ctx.mesh, ctx.tag = mesh, tag
        return all_gather(x, 0, mesh, tag, "fwd")

    @staticmethod
    def backward(ctx, grad):
        # The consumer is tensor-parallel, so each rank holds a partial grad of the full sequence (its shape
        # is the forward's output's, which the forward's check made the same on every rank).
        return reduce_scatter(grad, ctx.mesh, ctx.tag, "bwd", check_shape=False), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag):
        ctx.mesh, ctx.tag = mesh, tag
        return reduce_scatter(x, mesh, tag, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 0, ctx.mesh, ctx.tag, "bwd", check_shape=False), None, None  # checked forward


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag):
        ctx.mesh, ctx.tag = mesh, tag
        return _split(x, 0, mesh)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 0, ctx.mesh, ctx.tag, "bwd"), None, None


class _CopyParamsToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mesh, tag, *params):
        ctx.mesh, ctx.tag = mesh, tag
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        if len(grads) == 1 and grads[0] is not None:  # one bias: no packing (the common SP case)
            return None, None, all_reduce_(grads[0].clone(), ctx.mesh, ctx.tag, "bwd")
        present = [g for g in grads if g is not None]
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in present]), ctx.mesh, ctx.tag, "bwd")
        out, offset = [], 0
        for g in grads:
            if g is None:
                out.append(None)
                continue
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return (None, None, *out)


class _SumGradOverReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, tag, ranges, full_size):
        ctx.mesh, ctx.tag, ctx.ranges, ctx.full_size = mesh, tag, ranges, full_size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Ranks holding the same rows add their grads: each rank adds its rows into a zero buffer of
        # the full size and one all-reduce sums every shared row at once. That moves the full (small:
        # kv heads only) tensor instead of needing a process group per set of sharing ranks.
        full = grad.new_zeros((ctx.full_size, *grad.shape[1:]))
        offset = 0
        for start, stop in ctx.ranges:
            full[start:stop] += grad[offset : offset + stop - start]
            offset += stop - start
        full = all_reduce_(full, ctx.mesh, ctx.tag, "bwd")
        summed = torch.cat([full[start:stop] for start, stop in ctx.ranges])
        return summed, None, None, None, None


# ---- public API ----------------------------------------------------------------------------------


def copy_to_tp(x: torch.Tensor, mesh: Mesh, tag: str = "copy_to_tp") -> torch.Tensor:
    """Enter a tensor-parallel region. x: replicated [..., h] -> same; grad all-reduced."""
    return x if mesh.tp_size == 1 else _CopyToTP.apply(x, mesh, tag)


def reduce_from_tp(x: torch.Tensor, mesh: Mesh, tag: str = "reduce_from_tp") -> torch.Tensor:
    """Leave a tensor-parallel region. x: partial sums [..., h] -> their sum, replicated."""
    return x if mesh.tp_size == 1 else _ReduceFromTP.apply(x, mesh, tag)


def gather_from_tp(x: torch.Tensor, mesh: Mesh, tag: str = "gather_from_tp", sizes=None) -> torch.Tensor:
    """x: [..., n/tp] -> [..., n], concatenated in rank order. `sizes`: every rank's share of the
    last dim when they differ (uneven splits)."""
    return x if mesh.tp_size == 1 else _GatherFromTP.apply(x, mesh, tag, _uneven(sizes))


def scatter_to_tp(x: torch.Tensor, mesh: Mesh, tag: str = "scatter_to_tp", sizes=None) -> torch.Tensor:
    """x: [..., n] replicated -> [..., n/tp], this rank's slice (`sizes`: uneven shares)."""
    return x if mesh.tp_size == 1 else _ScatterToTP.apply(x, mesh, tag, _uneven(sizes))


def _uneven(sizes):
    return None if sizes is None or len(set(sizes)) == 1 else list(sizes)


def gather_from_sp(x: torch.Tensor, mesh: Mesh, tag: str = "gather_from_sp") -> torch.Tensor:
    """x: [s/tp, ...] this rank's tokens -> [s, ...]; grad reduce-scattered (consumer is TP)."""
    return x if mesh.tp_size == 1 else _GatherFromSP.apply(x, mesh, tag)


def reduce_scatter_to_sp(x: torch.Tensor, mesh: Mesh, tag: str = "reduce_scatter_to_sp") -> torch.Tensor:
    """x: [s, ...] partial sums -> [s/tp, ...] this rank's tokens of the sum."""
    return x if mesh.tp_size == 1 else _ReduceScatterToSP.apply(x, mesh, tag)


def scatter_to_sp(x: torch.Tensor, mesh: Mesh, tag: str = "scatter_to_sp") -> torch.Tensor:
    """x: [s, ...] replicated -> [s/tp, ...] this rank's tokens."""
    return x if mesh.tp_size == 1 else _ScatterToSP.apply(x, mesh, tag)


def copy_params_to_tp(params: list[torch.Tensor], mesh: Mesh, tag: str = "copy_params_to_tp"):
    """Replicated parameters used on different data per rank (sequence-parallel norms, biases):
    identity forward; backward sums their grads over tp in one all-reduce."""
    if mesh.tp_size == 1:
        return tuple(params)
    return _CopyParamsToTP.apply(mesh, tag, *params)


def sum_grad_over_replicas(
    x: torch.Tensor, mesh: Mesh, ranges, full_size: int, tag: str = "sum_grad_over_replicas"
) -> torch.Tensor:
    """x: the rows `ranges` ([(start, stop), ...], concatenated) of a [full_size, ...] tensor of which
    several ranks hold some rows (shared kv heads). Identity forward; backward gives each holder of
    a row the sum of all its holders' grads."""
    return x if mesh.tp_size == 1 else _SumGradOverReplicas.apply(x, mesh, tag, tuple(ranges), full_size)
