"""Causal self-attention with heads split across tp ranks (Megatron): q/k/v are column-parallel over
whole heads, each rank attends over its own heads, the output projection is row-parallel.

Grouped-query attention and uneven splits: each rank holds the kv heads its q heads read (see
heads.py); a kv head needed on several ranks is held by each, and its grads are summed over them in
backward so the copies stay equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import rng
from ..comm.checks import shapes_agreed
from ..heads import head_shards, layout_hint
from ..layers import ColumnParallelLinear, RowParallelLinear
from ..layers.linear import column_linear
from ..mesh import Mesh, resolve
from ..sharding import set_shard_info


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [s] -> (cos, sin): [s, head_dim] fp32, each angle twice (the rotate-half layout)."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [s, d/2]
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([angles.sin(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [..., d] with cos, sin broadcastable to it (x's dtype)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding, rotate-half layout. x: [s, b, heads, d], positions: [s]."""
    cos, sin = rotary_tables(positions, x.shape[-1], theta)
    return apply_rotary(x, cos[:, None, None, :].to(x.dtype), sin[:, None, None, :].to(x.dtype))


class KVCache:
    """One attention layer's cached keys and values: [b, local kv heads, tokens so far, head_dim]."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class ParallelAttention(nn.Module):
    """x: [s, b, hidden] (sequence_parallel: [s/tp, b, hidden]) -> same shape."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = True, rope: bool = False, rope_theta: float = 10000.0, attn_dropout: float = 0.0,
                 sequence_parallel: bool = False, mesh: Mesh | None = None, device=None,
                 dtype: torch.dtype = torch.float32, overlap: bool = False, chunks: int = 1):  # fmt: skip
        super().__init__()
        self.mesh = resolve(mesh)
        self.overlap = overlap
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if hidden % num_heads:
                raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}; pass head_dim")
            head_dim = hidden // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        shards = head_shards(num_heads, num_kv_heads, head_dim, self.mesh.tp_size, self.mesh.tp_rank)
        self.layout = lay = shards.layout
        self.rope, self.rope_theta, self.attn_dropout = rope, rope_theta, attn_dropout
        common = dict(bias=bias, sequence_parallel=sequence_parallel, mesh=self.mesh, device=device, dtype=dtype)
        if overlap:  # async collectives overlapped with the GEMMs (overlap.py); the math is unchanged
            common |= dict(overlap=True, chunks=chunks)
        d, kv = head_dim, shards.kv
        self.q_proj = ColumnParallelLinear(hidden, num_heads * d, out_ranges=shards.q.ranges, **common)
        self.k_proj = ColumnParallelLinear(hidden, num_kv_heads * d, out_ranges=kv.ranges, replicated=kv.replicated,
                                           **common)  # fmt: skip
        self.v_proj = ColumnParallelLinear(hidden, num_kv_heads * d, out_ranges=kv.ranges, replicated=kv.replicated,
                                           **common)  # fmt: skip
        self.o_proj = RowParallelLinear(num_heads * d, hidden, in_range=shards.o.ranges[0], **common)
        self._kv_repeat = lay.uniform_repeat
        index_device = device if device is not None else self.mesh.device
        self.register_buffer("_kv_index", torch.tensor(lay.kv_index, device=index_device), persistent=False)
        # How the full tensors are cut, so a checkpoint can be resharded offline to another tp.
        for role, proj in (("q", self.q_proj), ("kv", self.k_proj), ("kv", self.v_proj)):
            for param in proj.parameters():
                set_shard_info(param, layout=layout_hint("heads", num_heads, num_kv_heads, d, role))
        set_shard_info(self.o_proj.weight, layout=layout_hint("heads", num_heads, num_kv_heads, d, "o"))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """cache: this layer's keys and values so far (generation); it is extended in place."""
        q, k, v = column_linear(x, self.q_proj, self.k_proj, self.v_proj)  # one input collective for the three
        s, b = q.shape[0], q.shape[1]
        lay = self.layout
        q = q.view(s, b, lay.q_heads, self.head_dim)
        k = k.view(s, b, lay.kv_heads, self.head_dim)
        v = v.view(s, b, lay.kv_heads, self.head_dim)
        past = 0 if cache is None else cache.length
        if self.rope:
            positions = torch.arange(past, past + s, device=q.device)
            q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if cache is not None:
            k, v = cache.extend(k, v)  # [b, local kv heads, past + s, d]: only this rank's heads
        if self._kv_repeat is None:  # an uneven split cut a kv group: pick each q head's kv head
            k, v = k.index_select(1, self._kv_index), v.index_select(1, self._kv_index)
        elif self._kv_repeat > 1:
            k, v = k.repeat_interleave(self._kv_repeat, dim=1), v.repeat_interleave(self._kv_repeat, dim=1)
        if self.training and self.attn_dropout > 0.0:
            # Explicit softmax so the dropout mask comes from this rank's tp stream: heads differ per rank.
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
            probs = rng.dropout(probs, self.attn_dropout, True, self.mesh, sharded=True)
            out = probs @ v
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries sit after the cached keys: query i sees keys up to past + i
            visible = torch.arange(s, device=q.device)[:, None] + past >= torch.arange(past + s, device=q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        out = out.permute(2, 0, 1, 3).reshape(s, b, lay.q_heads * self.head_dim)
        with shapes_agreed():  # the exit's [s, b, hidden] follows from the entry's checked gather
            return self.o_proj(out)
