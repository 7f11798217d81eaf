"""Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)).

Per block and step at tp > 1 (activations [s, b, h]): forward 2 all-reduces of s*b*h elements (after
the attention and MLP row-parallel layers), backward 2 more (before their column-parallel layers).
With sequence parallelism: forward 2 all-gathers + 2 reduce-scatters, backward the same; the replicated
norm/bias grads of ALL blocks are summed over tp by one coalesced async all-reduce per backward (comm.grad_sync).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import rng
from ..layers.norm import Norm
from ..mesh import Mesh, resolve
from .attention import ParallelAttention
from .mlp import ParallelMLP


class ParallelTransformerBlock(nn.Module):
    """x: [s, b, hidden] (sequence_parallel: [s/tp, b, hidden]) -> same shape."""

    def __init__(self, hidden: int, num_heads: int, ffn_hidden: int | None = None, num_kv_heads: int | None = None,
                 activation: str = "gelu", norm: str = "layernorm", bias: bool = True, rope: bool = False,
                 dropout: float = 0.0, attn_dropout: float = 0.0, sequence_parallel: bool = False,
                 mesh: Mesh | None = None, device=None, dtype: torch.dtype = torch.float32, overlap: bool = False,
                 chunks: int = 1):  # fmt: skip
        super().__init__()
        self.mesh = resolve(mesh)
        ffn_hidden = 4 * hidden if ffn_hidden is None else ffn_hidden
        self.dropout, self.sequence_parallel = dropout, sequence_parallel
        common = dict(sequence_parallel=sequence_parallel, mesh=self.mesh, device=device, dtype=dtype)
        self.norm1 = Norm(hidden, norm, **common)
        self.attn = ParallelAttention(hidden, num_heads, num_kv_heads, bias=bias, rope=rope,
                                      attn_dropout=attn_dropout, overlap=overlap, chunks=chunks, **common)  # fmt: skip
        self.norm2 = Norm(hidden, norm, **common)
        self.mlp = ParallelMLP(hidden, ffn_hidden, activation, bias=bias, overlap=overlap, chunks=chunks, **common)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism each rank holds other tokens, so masks come from the tp stream.
        return rng.dropout(x, self.dropout, self.training, self.mesh, sharded=self.sequence_parallel)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """cache: an attention.KVCache for generation (None in training)."""
        x = x + self._drop(self.attn(self.norm1(x), cache))
        return x + self._drop(self.mlp(self.norm2(x)))
