"""Column- and row-parallel linear layers (Megatron): y = x W^T + b with W: [out, in] split by rows
(column-parallel: each rank computes some output features) or by columns (row-parallel: each rank
computes a partial sum over some input features).

Where the communication happens, forward | backward:
    ColumnParallelLinear   copy_to_tp: none | all-reduce of dx      (SP: all-gather | reduce-scatter)
    RowParallelLinear      reduce_from_tp: all-reduce of y | none   (SP: reduce-scatter | all-gather)

overlap=True runs the same collectives asynchronously behind the matmuls, and chunks=k splits the tokens
so chunk i's collective flies while chunk i+1 is computed (see overlapped.py). One entry point per kind
picks plain or overlapped: `column_linear(x, *layers)` (several projections of one input, q/k/v or
gate/up, paying for its communication once; a column layer's forward is column_linear(x, self)) and
RowParallelLinear.forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..initialization import linear_fill, make_param
from ..mesh import Mesh, resolve
from ..sharding import ShardSpec, balanced_range, copy_shard_info, shard_spec, split_range, take
from .overlapped import LinearOptions, column_overlapped, row_overlapped


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
    """What column and row layers share: argument checks, the mesh, the options, the parameters,
    from_dense and the repr."""

    # The constructor's keyword options from_dense passes on (the sizes, bias, dtype come from the dense layer).
    FROM_DENSE_OPTIONS: tuple[str, ...] = ()
    _FLAG = ""  # the layer kind's own boolean option, shown by extra_repr

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

    def _options(self) -> LinearOptions:
        return LinearOptions(self.mesh, self.tag, self.sequence_parallel, self.chunks)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mesh: Mesh | None = None, **options):
        """This rank's share of a dense nn.Linear (weight [out, in]); the layer equals the dense one. Its
        sizes, bias and dtype are the dense layer's; `options` are any of FROM_DENSE_OPTIONS (column:
        gather_output, sequence_parallel, out_ranges, replicated, overlap, chunks; row: input_is_parallel,
        sequence_parallel, in_range, overlap, chunks). Draws nothing from torch's random generator."""
        if "bias" in options:
            raise ValueError(
                f"{cls.__name__}.from_dense takes the bias from the dense layer (it has "
                f"{'one' if linear.bias is not None else 'none'}); drop bias=, or build the nn.Linear with "
                "bias=False"
            )
        unknown = sorted(set(options) - set(cls.FROM_DENSE_OPTIONS))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_dense got unexpected options {unknown}; it accepts "
                            f"{list(cls.FROM_DENSE_OPTIONS)} (sizes and dtype come from the dense layer)")  # fmt: skip
        # on the meta device: nothing is drawn or allocated before the dense values are adopted
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mesh=mesh, device="meta",
                    dtype=linear.weight.dtype, **options)  # fmt: skip
        dense = {"weight": linear.weight} | ({"bias": linear.bias} if linear.bias is not None else {})
        adopt_shards(layer, dense)
        return layer

    def extra_repr(self) -> str:
        spec = shard_spec(self.weight)
        held = f"rows {spec.ranges}" if spec.dim == 0 else f"cols {spec.ranges}"
        return (
            f"in={self.in_features}, out={self.out_features} ({held}), tp={self.mesh.tp_size}, "
            f"bias={self.bias is not None}, {self._FLAG}={getattr(self, self._FLAG)}, "
            f"sequence_parallel={self.sequence_parallel}"
            + (f", overlap=True, chunks={self.chunks}" if self.overlap else "")
        )


class ColumnParallelLinear(_ParallelLinear):
    """Rank i holds some rows of W: out/tp of them by default (shares differ by one where tp does not
    divide out).

    x: [..., in] replicated (with sequence_parallel: [s/tp, ..., in], this rank's tokens)
    -> y: [..., out_local] (gather_output: [..., out]; with sequence_parallel: [s, ..., ...]).

    `out_ranges=[(start, stop), ...]` picks the rows explicitly (whole heads; q, k and v blocks of a
    fused projection); `replicated=True` says other ranks may hold some of the same rows, whose
    grads are then summed across their holders in backward.
    """

    FROM_DENSE_OPTIONS = ("gather_output", "sequence_parallel", "out_ranges", "replicated", "overlap", "chunks")
    _FLAG = "gather_output"

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

    def _local_params(self) -> tuple:
        """(weight, bias) as the local matmul uses them (rows other ranks also hold get their grads summed)."""
        weight, bias = self.weight, self.bias
        if self.replicated:
            weight = comm.sum_grad_over_replicas(weight, self.mesh, self.out_ranges, self.out_features, self.tag)
            if bias is not None:
                bias = comm.sum_grad_over_replicas(bias, self.mesh, self.out_ranges, self.out_features, self.tag)
        return weight, bias

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """The local matmul's output as the layer returns it (gathered over tp with gather_output)."""
        if self.gather_output:
            y = comm.gather_from_tp(y, self.mesh, self.tag, self._gather_sizes)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_linear(x, self)[0]


def column_linear(x: torch.Tensor, *layers: ColumnParallelLinear) -> tuple[torch.Tensor, ...]:
    """The outputs of column-parallel layers sharing one input (one layer; q, k, v; gate, up), the input's
    communication paid once: x: [s, ..., in] (sequence_parallel: [s/tp, ..., in]) -> one [s, ..., out_j/tp]
    per layer ([..., out_j] with gather_output). Plain: copy_to_tp (SP: gather_from_sp), then one matmul
    each; overlap=True at tp > 1: the same collectives async behind the matmuls (overlapped.py)."""
    first = layers[0]
    key = lambda layer: (layer.mesh, layer.in_features, layer.sequence_parallel, layer.overlap, layer.chunks)  # noqa: E731
    for layer in layers[1:]:
        if key(layer) != key(first):
            raise ValueError(f"{layer.tag} cannot share its input with {first.tag}: mesh, in_features, "
                             "sequence_parallel, overlap and chunks must agree")  # fmt: skip
    if x.shape[-1] != first.in_features:
        raise ValueError(f"{first.tag}: expected input [..., {first.in_features}], got {list(x.shape)}")
    weights, biases = zip(*(layer._local_params() for layer in layers), strict=True)
    if first.overlap and first.mesh.tp_size > 1:
        ys = column_overlapped(x, first._options(), weights, biases)
    else:
        if first.sequence_parallel:
            x = comm.gather_from_sp(x, first.mesh, first.tag)
        else:
            x = comm.copy_to_tp(x, first.mesh, first.tag)
        ys = [comm.timed_compute(layer.tag, F.linear, x, w, b)
              for layer, w, b in zip(layers, weights, biases, strict=True)]  # fmt: skip
    return tuple(layer._output(y) for layer, y in zip(layers, ys, strict=True))


class RowParallelLinear(_ParallelLinear):
    """Rank i holds columns [start, stop) of W (in/tp of them by default, shares differing by one
    where tp does not divide in; `in_range` picks them, e.g. whole heads).

    x: [..., in/tp] (input_is_parallel=False: [..., in], split here) -> y: [..., out] replicated
    (with sequence_parallel: [s/tp, ..., out], this rank's tokens). The bias is added once, after
    the reduction. forward() is the one entry point: plain or overlapped (overlap=True) reduction.
    """

    FROM_DENSE_OPTIONS = ("input_is_parallel", "sequence_parallel", "in_range", "overlap", "chunks")
    _FLAG = "input_is_parallel"

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
            y = row_overlapped(x, self._options(), self.weight)
        else:
            y = comm.timed_compute(self.tag, F.linear, x, self.weight)
            if self.sequence_parallel:
                y = comm.reduce_scatter_to_sp(y, self.mesh, self.tag)
            else:
                y = comm.reduce_from_tp(y, self.mesh, self.tag)
        if self.bias is None:
            return y
        bias = self.bias
        if self.sequence_parallel:  # each rank adds it to other tokens: its grads are summed (coalesced, async)
            (bias,) = comm.replicated_params([bias], self.mesh, self.tag)
        return y + bias

    def replicated_grad_parameters(self) -> list[nn.Parameter]:
        """The parameters whose grads the coalesced sync sums over tp (data_parallel.wrap_ddp leaves them to it)."""
        if not self.sequence_parallel or self.mesh.tp_size == 1 or self.bias is None:
            return []
        return [self.bias]


def adopt_shards(layer: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Replace each (meta) parameter of `layer` by its shard of the full tensor `dense[name]`, as its
    ShardSpec says; the full tensors keep their dense layout ([out, in] for a linear weight)."""
    for name, full in dense.items():
        old = getattr(layer, name)
        values = take(full.detach(), shard_spec(old))
        if tuple(old.shape) != tuple(values.shape):
            raise ValueError(f"{layer.tag}.{name}: expected shape {tuple(old.shape)}, got {tuple(values.shape)}")
        new = nn.Parameter(values.clone().to(layer.mesh.device), requires_grad=old.requires_grad)
        copy_shard_info(old, new)
        setattr(layer, name, new)
