"""The Megatron MLP: column-parallel up-projection, activation on the local ffn/tp features, row-parallel
down-projection. One all-reduce forward (after down) and one backward (before up)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm.checks import shapes_agreed
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..layers.linear import column_linear
from ..mesh import Mesh, resolve


class ParallelMLP(nn.Module):
    """x: [s, b, hidden] (sequence_parallel: [s/tp, b, hidden]) -> same shape.

    activation 'gelu': down(gelu(up(x))); 'swiglu': down(silu(gate(x)) * up(x)), gate and up sharing
    one input all-reduce."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str = "gelu", bias: bool = True,
                 sequence_parallel: bool = False, mesh: Mesh | None = None, device=None,
                 dtype: torch.dtype = torch.float32, overlap: bool = False, chunks: int = 1):  # fmt: skip
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.mesh = resolve(mesh)
        self.activation = activation
        col = dict(bias=bias, sequence_parallel=sequence_parallel, mesh=self.mesh, device=device, dtype=dtype)
        if overlap:  # async collectives behind the GEMMs (layers/overlapped.py); the math is unchanged
            col |= dict(overlap=True, chunks=chunks)
        if activation == "swiglu":
            self.gate = ColumnParallelLinear(hidden, ffn_hidden, **col)
        self.up = ColumnParallelLinear(hidden, ffn_hidden, **col)
        self.down = RowParallelLinear(ffn_hidden, hidden, **col)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":  # gate and up share one input collective
            gate, up = column_linear(x, self.gate, self.up)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.up(x))
        with shapes_agreed():  # the exit's [s, b, hidden] follows from the entry's checked gather
            return self.down(h)
