"""The collectives as torch.compile sees them: torch.distributed's functional collectives.

Under `torch.compile` (dynamo) a `dist.all_reduce` is a graph break (fullgraph=True fails on it), and the Python
around it (the observers' timing in events.run_collective, the shape agreement of checks.before, which itself
issues collectives) cannot be traced either. So the primitives of collectives.py route here when
`torch.compiler.is_compiling()`: functional ops (out of place, with a `wait_tensor` the compiler places) that
dynamo captures into the graph and AOTAutograd differentiates through the autograd duals' own backward. Eager code
never comes here: its behaviour (observers, checks, in-place results) is unchanged.

What a compiled graph gives up: observers see no per-collective events (the profiler measures eager runs), and
ranks do not agree on shapes before issuing (a compiled step runs the shapes its eager trace checked).

    all_reduce(x, group, op)             [...] -> [...] summed (or maxed) over the group
    all_gather(x, dim, group, size)      [..., n, ...] -> [..., n * size, ...], rank order along dim
    reduce_scatter(x, group, size)       [n * size, ...] -> [n, ...] this rank's slice of the sum (dim 0)
    Ready(tensor)                        what async_op=True gives under compile: the compiler schedules the
                                         wait itself, so wait() just returns the (functional) result
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

__all__ = ["Ready", "all_gather", "all_reduce", "compiling", "reduce_scatter"]


def compiling() -> bool:
    """Whether dynamo is tracing this call (the collectives must then be functional ops)."""
    return torch.compiler.is_compiling()


def _reduce_name(op) -> str:
    if op == dist.ReduceOp.SUM:
        return "sum"
    if op == dist.ReduceOp.MAX:
        return "max"
    raise NotImplementedError(f"reduce op {op} under torch.compile: only SUM and MAX are traced; run eagerly")


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """x: [...] -> a new tensor, the sum (or max) over `group`'s ranks."""
    return fc.wait_tensor(fc.all_reduce(x, _reduce_name(op), group))


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """x: [..., n, ...] -> [..., n * size, ...], the ranks' tensors concatenated in rank order along `dim`."""
    return fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), dim, group))


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """x: [n * size, ...] partial sums -> [n, ...], this rank's rows of their sum."""
    return fc.wait_tensor(fc.reduce_scatter_tensor(x.contiguous(), "sum", 0, group))


class Ready:
    """An async collective under compile: already a value in the graph; wait() returns it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor
