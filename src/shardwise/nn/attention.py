"""Causal self-attention with heads split across tp ranks (Megatron): q/k/v are column-parallel over
whole heads, each rank attends over its own heads, the output projection is row-parallel.

Grouped-query attention: with num_kv_heads >= tp the kv heads are split like the q heads; with
num_kv_heads < tp each rank holds the one kv head its q heads use, replicated on tp/num_kv_heads
ranks, and those replicas' grads are summed in backward so they stay equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import random as sw_random
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..mesh import Mesh, resolve


@dataclass(frozen=True)
class HeadLayout:
    q_start: int  # first global q head on this rank
    q_heads: int  # q heads on this rank
    kv_start: int
    kv_heads: int
    kv_replicated: bool


def head_layout(num_heads: int, num_kv_heads: int, mesh: Mesh) -> HeadLayout:
    tp = mesh.tp_size
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if num_heads % tp:
        fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"num_heads={num_heads} is not divisible by tp={tp}; use tp in {{{', '.join(map(str, fits))}}} "
            f"or a head count that is a multiple of {tp}"
        )
    q_heads = num_heads // tp
    q_start = mesh.tp_rank * q_heads
    if num_kv_heads % tp == 0:
        kv_heads = num_kv_heads // tp
        return HeadLayout(q_start, q_heads, mesh.tp_rank * kv_heads, kv_heads, False)
    if tp % num_kv_heads == 0:
        group = num_heads // num_kv_heads  # q heads per kv head
        return HeadLayout(q_start, q_heads, q_start // group, 1, True)
    raise ValueError(
        f"num_kv_heads={num_kv_heads} and tp={tp}: one must divide the other so kv heads split or "
        "replicate whole; pick tp dividing num_kv_heads or a multiple of it"
    )


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding, rotate-half layout. x: [s, b, heads, d], positions: [s]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [s, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, None, :].to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class ParallelAttention(nn.Module):
    """x: [s, b, hidden] (sequence_parallel: [s/tp, b, hidden]) -> same shape."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = True, rope: bool = False, rope_theta: float = 10000.0, attn_dropout: float = 0.0,
                 sequence_parallel: bool = False, mesh: Mesh | None = None, device=None,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.mesh = resolve(mesh)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if hidden % num_heads:
                raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = hidden // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layout = layout = head_layout(num_heads, num_kv_heads, self.mesh)
        self.rope, self.rope_theta, self.attn_dropout = rope, rope_theta, attn_dropout
        common = dict(bias=bias, sequence_parallel=sequence_parallel, mesh=self.mesh, device=device, dtype=dtype)
        d = head_dim
        self.q_proj = ColumnParallelLinear(hidden, num_heads * d, **common)
        kv_rows = (layout.kv_start * d, (layout.kv_start + layout.kv_heads) * d)
        self.k_proj = ColumnParallelLinear(hidden, num_kv_heads * d, out_range=kv_rows,
                                           replicated=layout.kv_replicated, **common)  # fmt: skip
        self.v_proj = ColumnParallelLinear(hidden, num_kv_heads * d, out_range=kv_rows,
                                           replicated=layout.kv_replicated, **common)  # fmt: skip
        self.o_proj = RowParallelLinear(num_heads * d, hidden, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_proj.enter(x)  # [s, b, hidden], entered once for q, k and v
        s, b = x.shape[0], x.shape[1]
        lay = self.layout
        q = self.q_proj.project(x).view(s, b, lay.q_heads, self.head_dim)
        k = self.k_proj.project(x).view(s, b, lay.kv_heads, self.head_dim)
        v = self.v_proj.project(x).view(s, b, lay.kv_heads, self.head_dim)
        if self.rope:
            positions = torch.arange(s, device=x.device)
            q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if lay.kv_heads != lay.q_heads:
            repeat = lay.q_heads // lay.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.training and self.attn_dropout > 0.0:
            # Explicit softmax so the dropout mask comes from this rank's tp stream: heads differ per rank.
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
            probs = sw_random.dropout(probs, self.attn_dropout, True, self.mesh, sharded=True)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.permute(2, 0, 1, 3).reshape(s, b, lay.q_heads * self.head_dim)
        return self.o_proj(out)
