"""Column- and row-parallel linear layers (Megatron): y = x W^T + b with W: [out, in] split by rows
(column-parallel: each rank computes some output features) or by columns (row-parallel: each rank
computes a partial sum over some input features).

Where the communication happens, forward | backward:
    ColumnParallelLinear   copy_to_tp: none | all-reduce of dx      (SP: all-gather | reduce-scatter)
    RowParallelLinear      reduce_from_tp: all-reduce of y | none   (SP: reduce-scatter | all-gather)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..init import linear_fill, make_param
from ..mesh import Mesh, resolve
from ..sharding import ShardSpec, even_range


def _check_features(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_range(rng: tuple[int, int] | None, total: int, mesh: Mesh, what: str) -> tuple[int, int]:
    if rng is None:
        return even_range(total, mesh, what)
    start, stop = rng
    if not (0 <= start < stop <= total):
        raise ValueError(f"{what} range {rng} must satisfy 0 <= start < stop <= {total}")
    return start, stop - start


class ColumnParallelLinear(nn.Module):
    """Rank i holds rows [start, start + size) of W (out/tp of them by default).

    x: [..., in] replicated (with sequence_parallel: [s/tp, ..., in], this rank's tokens)
    -> y: [..., out/tp] (gather_output: [..., out]; with sequence_parallel: [s, ..., ...]).

    `out_range=(start, stop)` overrides the even split (uneven heads); `replicated=True` says other
    ranks hold the same rows, whose grads are then summed across the holders in backward.
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
        out_range: tuple[int, int] | None = None,
        replicated: bool = False,
        init_fill=None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        self.mesh = resolve(mesh)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        start, size = _check_range(out_range, out_features, self.mesh, "ColumnParallelLinear out_features")
        if gather_output and (out_range is not None or replicated):
            raise ValueError("gather_output needs the even split; drop out_range/replicated or gather yourself")
        self.out_start, self.out_size, self.replicated = start, size, replicated
        self.tag = type(self).__name__
        device = device if device is not None else self.mesh.device
        fill = init_fill or linear_fill(in_features)
        spec = ShardSpec(0, start, size, out_features, replicated)
        self.weight = make_param((out_features, in_features), fill, spec, dtype, device)
        if bias:
            self.bias = make_param((out_features,), linear_fill(in_features), spec, dtype, device)
        else:
            self.register_parameter("bias", None)

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
        weight, bias = self.weight, self.bias
        if self.replicated:
            weight = comm.sum_grad_over_replicas(weight, self.mesh, self.out_start, self.out_features, self.tag)
            if bias is not None:
                bias = comm.sum_grad_over_replicas(bias, self.mesh, self.out_start, self.out_features, self.tag)
        y = comm.timed_compute(self.tag, F.linear, x, weight, bias)
        if self.gather_output:
            y = comm.gather_from_tp(y, self.mesh, self.tag)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.enter(x))

    @classmethod
    def from_dense(cls, linear: nn.Linear, mesh: Mesh | None = None, **kwargs) -> ColumnParallelLinear:
        """This rank's rows of a dense nn.Linear (weight [out, in]); the layer equals the dense one."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mesh=mesh,
                    device="meta", dtype=linear.weight.dtype, **kwargs)  # fmt: skip
        rows = slice(layer.out_start, layer.out_start + layer.out_size)
        _adopt(layer, "weight", linear.weight.detach()[rows])
        if linear.bias is not None:
            _adopt(layer, "bias", linear.bias.detach()[rows])
        return layer

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (rows {self.out_start}:"
            f"{self.out_start + self.out_size}), tp={self.mesh.tp_size}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """Rank i holds columns [start, start + size) of W (in/tp of them by default).

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
    ):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        self.mesh = resolve(mesh)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        start, size = _check_range(in_range, in_features, self.mesh, "RowParallelLinear in_features")
        if not input_is_parallel and in_range is not None:
            raise ValueError("input_is_parallel=False splits the input evenly; drop in_range")
        self.in_start, self.in_size = start, size
        self.tag = type(self).__name__
        device = device if device is not None else self.mesh.device
        fill = init_fill or linear_fill(in_features)
        spec = ShardSpec(1, start, size, in_features)
        self.weight = make_param((out_features, in_features), fill, spec, dtype, device)
        if bias:
            self.bias = make_param((out_features,), linear_fill(in_features), None, dtype, device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{self.tag}: expected input [..., {self.in_features}], got {list(x.shape)}")
            x = comm.scatter_to_tp(x, self.mesh, self.tag)
        elif x.shape[-1] != self.in_size:
            raise ValueError(
                f"{self.tag}: expected this rank's input shard [..., {self.in_size}] (in_features="
                f"{self.in_features} over tp={self.mesh.tp_size}), got {list(x.shape)}; pass "
                "input_is_parallel=False for a full input, or check the producing layer uses the same mesh"
            )
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
        _adopt(layer, "weight", linear.weight.detach()[:, layer.in_start : layer.in_start + layer.in_size])
        if linear.bias is not None:
            _adopt(layer, "bias", linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (cols {self.in_start}:{self.in_start + self.in_size}), "
            f"out={self.out_features}, tp={self.mesh.tp_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
        )


def _adopt(layer: nn.Module, name: str, values: torch.Tensor) -> None:
    """Replace a (meta) parameter by a copy of `values`, keeping its shard metadata."""
    old = getattr(layer, name)
    if tuple(old.shape) != tuple(values.shape):
        raise ValueError(f"{layer.tag}.{name}: expected shape {tuple(old.shape)}, got {tuple(values.shape)}")
    new = nn.Parameter(values.clone().to(layer.mesh.device), requires_grad=old.requires_grad)
    new.tp_shard = getattr(old, "tp_shard", None)
    setattr(layer, name, new)
