"""Column- and row-parallel linear layers (Megatron): y = x W^T + b with W: [out, in] split by rows
(column-parallel: each rank computes some output features) or by columns (row-parallel: each rank
computes a partial sum over some input features).

Where the communication happens, forward | backward:
    ColumnParallelLinear   copy_to_tp: none | all-reduce of dx      (SP: all-gather | reduce-scatter)
    RowParallelLinear      reduce_from_tp: all-reduce of y | none   (SP: reduce-scatter | all-gather)

overlap=True runs the same collectives asynchronously behind the matmuls, and chunks=k splits the tokens
so chunk i's collective flies while chunk i+1 is computed (see overlap.py). For a column layer this is its
forward(); enter() + project() (an input shared by q/k/v or gate/up) stay blocking: use
overlap.column_forward(x, *layers) to overlap a shared input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..initialization import linear_fill, make_param
from ..mesh import Mesh, resolve
from ..sharding import ShardSpec, balanced_range, shard_spec, split_range, take
from .overlapped import column_forward, row_forward


def _check_features(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_overlap(overlap: bool, chunks: int) -> None:
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
    if chunks > 1 and not overlap:
        raise ValueError("chunks splits the overlapped collectives: pass overlap=True with it")


def _check_ranges(ranges, total: int, what: str) -> tuple[tuple[int, int], ...]:
    ranges = tuple((int(a), int(b)) for a, b in ranges)
    for start, stop in ranges:
        if not (0 <= start < stop <= total):
            raise ValueError(f"{what} range ({start}, {stop}) must satisfy 0 <= start < stop <= {total}")
    return ranges


def _shares(total: int, tp: int) -> list[int]:
    """Every rank's share of `total` under the default (balanced) split, in rank order."""
    return [b - a for a, b in (balanced_range(total, tp, r) for r in range(tp))]


class _ParallelLinear(nn.Module):
    """What column and row layers share: argument checks, the mesh, the options, the parameters."""

    def __init__(self, in_features, out_features, sequence_parallel, mesh, overlap, chunks):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        _check_overlap(overlap, chunks)
        self.mesh = resolve(mesh)
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.overlap, self.chunks = sequence_parallel, overlap, chunks
        self.tag = type(self).__name__

    def _make_params(self, weight_spec, bias_spec, bias: bool, init_fill, device, dtype) -> None:
        device = device if device is not None else self.mesh.device
        fill = init_fill or linear_fill(self.in_features)
        self.weight = make_param((self.out_features, self.in_features), fill, weight_spec, dtype, device)
        if bias:
            self.bias = make_param((self.out_features,), linear_fill(self.in_features), bias_spec, dtype, device)
        else:
            self.register_parameter("bias", None)


class ColumnParallelLinear(_ParallelLinear):
    """Rank i holds some rows of W: out/tp of them by default (shares differ by one where tp does not
    divide out).

    x: [..., in] replicated (with sequence_parallel: [s/tp, ..., in], this rank's tokens)
    -> y: [..., out_local] (gather_output: [..., out]; with sequence_parallel: [s, ..., ...]).

    `out_ranges=[(start, stop), ...]` picks the rows explicitly (whole heads; q, k and v blocks of a
    fused projection); `replicated=True` says other ranks may hold some of the same rows, whose
    grads are then summed across their holders in backward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        mesh: Mesh | None = None,
        *,
        out_ranges=None,
        replicated: bool = False,
        init_fill=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        overlap: bool = False,
        chunks: int = 1,
    ):
        super().__init__(in_features, out_features, sequence_parallel, mesh, overlap, chunks)
        self.gather_output = gather_output
        if out_ranges is None:
            out_ranges = (split_range(out_features, self.mesh, "ColumnParallelLinear out_features"),)
            self._gather_sizes = _shares(out_features, self.mesh.tp_size)
        elif gather_output:
            raise ValueError("gather_output needs the default split; drop out_ranges or gather yourself")
        self.out_ranges = _check_ranges(out_ranges, out_features, "ColumnParallelLinear out_features")
        self.out_size = sum(b - a for a, b in self.out_ranges)
        self.replicated = replicated
        spec = ShardSpec(0, self.out_ranges, out_features, replicated)
        self._make_params(spec, spec, bias, init_fill, device, dtype)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The input's communication, split out so several projections of one input (q, k, v; gate,
        up) pay for it once: [s/tp or s, ..., in] -> [s, ..., in]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.tag}: expected input [..., {self.in_features}], got {list(x.shape)}")
        if self.sequence_parallel:
            return comm.gather_from_sp(x, self.mesh, self.tag)
        return comm.copy_to_tp(x, self.mesh, self.tag)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The local matmul on an already-entered input: [s, ..., in] -> [s, ..., out/tp]."""
        weight, bias = self.local_params()
        y = comm.timed_compute(self.tag, F.linear, x, weight, bias)
        return self.output(y)

    def local_params(self) -> list:
        """[weight, bias] as the local matmul uses them (rows other ranks also hold get their grads summed)."""
        weight, bias = self.weight, self.bias
        if self.replicated:
            weight = comm.sum_grad_over_replicas(weight, self.mesh, self.out_ranges, self.out_features, self.tag)
            if bias is not None:
                bias = comm.sum_grad_over_replicas(bias, self.mesh, self.out_ranges, self.out_features, self.tag)
        return [weight, bias]

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The local matmul's output as the layer returns it (gathered over tp with gather_output)."""
        if self.gather_output:
            y = comm.gather_from_tp(y, self.mesh, self.tag, self._gather_sizes)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.overlap:
            return column_forward(x, self)[0]
        return self.project(self.enter(x))

    @classmethod
    def from_dense(cls, linear: nn.Linear, mesh: Mesh | None = None, **kwargs) -> ColumnParallelLinear:
        """This rank's rows of a dense nn.Linear (weight [out, in]); the layer equals the dense one."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mesh=mesh,
                    device="meta", dtype=linear.weight.dtype, **kwargs)  # fmt: skip
        _adopt_from(layer, linear)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (rows {self.out_ranges}), "
            f"tp={self.mesh.tp_size}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
            + (f", overlap=True, chunks={self.chunks}" if self.overlap else "")
        )


class RowParallelLinear(_ParallelLinear):
    """Rank i holds columns [start, stop) of W (in/tp of them by default, shares differing by one
    where tp does not divide in; `in_range` picks them, e.g. whole heads).

    x: [..., in/tp] (input_is_parallel=False: [..., in], split here) -> y: [..., out] replicated
    (with sequence_parallel: [s/tp, ..., out], this rank's tokens). The bias is added once, after
    the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        mesh: Mesh | None = None,
        *,
        in_range: tuple[int, int] | None = None,
        init_fill=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        overlap: bool = False,
        chunks: int = 1,
    ):
        super().__init__(in_features, out_features, sequence_parallel, mesh, overlap, chunks)
        self.input_is_parallel = input_is_parallel
        if in_range is None:
            in_range = split_range(in_features, self.mesh, "RowParallelLinear in_features")
            self._scatter_sizes = _shares(in_features, self.mesh.tp_size)
        elif not input_is_parallel:
            raise ValueError("input_is_parallel=False splits the input by the default split; drop in_range")
        ((start, stop),) = _check_ranges([in_range], in_features, "RowParallelLinear in_features")
        self.in_start, self.in_size = start, stop - start
        # the bias is added once, after the reduction: whole on every rank
        self._make_params(ShardSpec(1, ((start, stop),), in_features), None, bias, init_fill, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{self.tag}: expected input [..., {self.in_features}], got {list(x.shape)}")
            x = comm.scatter_to_tp(x, self.mesh, self.tag, self._scatter_sizes)
        elif x.shape[-1] != self.in_size:
            raise ValueError(
                f"{self.tag}: expected this rank's input shard [..., {self.in_size}] (in_features="
                f"{self.in_features} over tp={self.mesh.tp_size}), got {list(x.shape)}; pass "
                "input_is_parallel=False for a full input, or check the producing layer uses the same mesh"
            )
        if self.mesh.tp_size == 1:  # nothing to reduce: one fused GEMM + bias, like nn.Linear
            return comm.timed_compute(self.tag, F.linear, x, self.weight, self.bias)
        if self.overlap:
            y = row_forward(self, x)
        else:
            y = comm.timed_compute(self.tag, F.linear, x, self.weight)
            if self.sequence_parallel:
                y = comm.reduce_scatter_to_sp(y, self.mesh, self.tag)
            else:
                y = comm.reduce_from_tp(y, self.mesh, self.tag)
        if self.bias is None:
            return y
        bias = self.bias
        if self.sequence_parallel:  # each rank adds it to other tokens: its grads must be summed
            (bias,) = comm.copy_params_to_tp([bias], self.mesh, self.tag)
        return y + bias

    @classmethod
    def from_dense(cls, linear: nn.Linear, mesh: Mesh | None = None, **kwargs) -> RowParallelLinear:
        """This rank's columns of a dense nn.Linear (weight [out, in]); the layer equals the dense one."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mesh=mesh,
                    device="meta", dtype=linear.weight.dtype, **kwargs)  # fmt: skip
        _adopt_from(layer, linear)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (cols {self.in_start}:{self.in_start + self.in_size}), "
            f"out={self.out_features}, tp={self.mesh.tp_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
            + (f", overlap=True, chunks={self.chunks}" if self.overlap else "")
        )


def adopt_shards(layer: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Replace each (meta) parameter of `layer` by its shard of the full tensor `dense[name]`, as its
    ShardSpec says; the full tensors keep their dense layout ([out, in] for a linear weight)."""
    for name, full in dense.items():
        old = getattr(layer, name)
        values = take(full.detach(), shard_spec(old))
        if tuple(old.shape) != tuple(values.shape):
            raise ValueError(f"{layer.tag}.{name}: expected shape {tuple(old.shape)}, got {tuple(values.shape)}")
        new = nn.Parameter(values.clone().to(layer.mesh.device), requires_grad=old.requires_grad)
        new.tp_shard = shard_spec(old)
        setattr(layer, name, new)


def _adopt_from(layer: nn.Module, linear: nn.Linear) -> None:
    dense = {"weight": linear.weight}
    if linear.bias is not None:
        dense["bias"] = linear.bias
    adopt_shards(layer, dense)
