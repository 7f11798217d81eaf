"""What many tests need: a rank's share of a dense tensor, a sharded grad gathered back, this rank's tokens."""

from __future__ import annotations

import torch

from shardwise.sharding import balanced_range, gather_full, shard_spec

FP32 = {"atol": 1e-5, "rtol": 1e-5}  # fp32 layers vs torch.nn / F.*
HF = {"atol": 1e-4, "rtol": 1e-4}  # Hugging Face models


def shard(x: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    """This rank's share of x along `dim` (the default balanced split: shares differ by at most one)."""
    start, stop = balanced_range(x.shape[dim], mesh.tp_size, mesh.tp_rank)
    return x.narrow(dim, start, stop - start)


def tokens(x: torch.Tensor, mesh, sequence_parallel: bool) -> torch.Tensor:
    """x: [s, ...] -> this rank's [s/tp, ...] under sequence parallelism, else x itself."""
    return x.chunk(mesh.tp_size, dim=0)[mesh.tp_rank] if sequence_parallel else x


def full_grad(param: torch.Tensor, mesh) -> torch.Tensor:
    """The dense gradient of a (possibly sharded) parameter, gathered over tp in its dense layout."""
    spec = shard_spec(param)
    return param.grad if spec is None else gather_full(param.grad, spec, mesh)
