"""Initialisation that does not depend on the TP degree.

A sharded parameter is filled as if the full matrix had been drawn, block of rows by block of rows,
each block from its own generator seeded by (parameter seed, block index). Any rank can therefore
draw exactly its slice, with the same seed a tp=1 and a tp=4 model hold the same full weights, and no
rank ever holds more than one block of the full matrix beyond its own shard.
"""

from __future__ import annotations

import math

import torch

from .sharding import set_shard_info

_BLOCK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per block: bounds the transient memory of a row-sliced init


def draw_seed() -> int:
    """Take a parameter seed from torch's default generator. Every rank consumes the same amount
    of it whatever its tp degree, so `torch.manual_seed(s)` fixes the full weights."""
    return int(torch.randint(0, 2**62, (1,)).item())


def uniform_fill(bound: float):
    return lambda block, gen: block.uniform_(-bound, bound, generator=gen)


def normal_fill(std: float):
    return lambda block, gen: block.normal_(0.0, std, generator=gen)


def linear_fill(in_features: int):
    """nn.Linear's default scale: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    return uniform_fill(1.0 / math.sqrt(in_features))


def init_shard(
    full_shape: tuple[int, ...],
    seed: int,
    fill,
    dim: int = 0,
    start: int = 0,
    size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows or columns [start, start + size) along `dim` (0 or 1) of the full tensor `full_shape`."""
    rows = full_shape[0]
    row_numel = math.prod(full_shape[1:])
    size = full_shape[dim] - start if size is None else size
    block_rows = max(1, _BLOCK_ELEMENTS // max(1, row_numel))
    if dim == 0:
        first, last = start, start + size
    else:
        first, last = 0, rows
    pieces = []
    for block in range(first // block_rows, (last - 1) // block_rows + 1 if last > first else 0):
        lo = block * block_rows
        hi = min(rows, lo + block_rows)
        gen = torch.Generator().manual_seed((seed + block) % (2**63))
        values = torch.empty((hi - lo, *full_shape[1:]), dtype=torch.float32)
        fill(values, gen)
        if dim == 0:
            values = values[max(first, lo) - lo : min(last, hi) - lo]
        else:
            values = values.narrow(1, start, size)
        pieces.append(values)
    if not pieces:
        shape = list(full_shape)
        shape[dim] = 0
        return torch.empty(shape, dtype=dtype)
    return torch.cat(pieces, 0).to(dtype).contiguous()


def make_param(full_shape, fill, spec, dtype: torch.dtype, device) -> torch.nn.Parameter:
    """A parameter holding this rank's slice (`spec`, a ShardSpec or None for the whole tensor) of a
    tensor drawn as a whole. On the meta device nothing is drawn, not even a seed (from_dense fills it instead)."""
    if spec is None:
        dim, ranges = 0, ((0, full_shape[0]),)
    else:
        dim, ranges = spec.dim, spec.ranges
    shape = tuple(sum(b - a for a, b in ranges) if d == dim else n for d, n in enumerate(full_shape))
    if torch.device(device).type == "meta":
        values = torch.empty(shape, dtype=dtype, device="meta")
    else:
        seed = draw_seed()  # only here: a meta parameter (from_dense) leaves the user's random stream alone
        pieces = [init_shard(tuple(full_shape), seed, fill, dim, a, b - a, dtype) for a, b in ranges]
        values = (torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]).to(device)
    param = torch.nn.Parameter(values)
    return set_shard_info(param, spec)
