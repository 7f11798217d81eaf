"""How a parameter is sharded: the metadata each sharded parameter carries, and gathering it back.

Parameters that know their own layout (nanotron's idea) let checkpoints reshard and tests compare
against the dense model without knowing which layer made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mesh import Mesh


@dataclass(frozen=True)
class ShardSpec:
    """This rank holds [start, start + size) of dim `dim` of a tensor whose full size there is `full`.
    `replicated`: other ranks hold the same range (kv heads when kv_heads < tp)."""

    dim: int
    start: int
    size: int
    full: int
    replicated: bool = False


def even_range(total: int, mesh: Mesh, what: str) -> tuple[int, int]:
    """(start, size) of this rank's equal share of `total`; ValueError naming the fix if uneven."""
    tp = mesh.tp_size
    if total % tp:
        lower = total // tp * tp
        options = ", ".join(str(v) for v in (lower, lower + tp) if v > 0)
        raise ValueError(f"{what}={total} is not divisible by tp={tp}; use a multiple of {tp} (e.g. {options})")
    size = total // tp
    return mesh.tp_rank * size, size


def mark(param: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    param.tp_shard = spec
    return param


def shard_spec(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, "tp_shard", None)


def gather_full(tensor: torch.Tensor, spec: ShardSpec | None, mesh: Mesh) -> torch.Tensor:
    """Reassemble the full tensor from every tp rank's shard (a plain collective, no autograd).
    Every rank of the tp group must call it. Unsharded tensors come back as they are."""
    if spec is None or mesh.tp_size == 1:
        return tensor.detach().clone()
    local = tensor.detach().movedim(spec.dim, 0).contiguous()
    ranges = [None] * mesh.tp_size
    dist.all_gather_object(ranges, (spec.start, spec.size), group=mesh.tp_group)
    longest = max(size for _, size in ranges)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    stacked = padded.new_empty((mesh.tp_size * longest, *padded.shape[1:]))
    dist.all_gather_single(stacked, padded, group=mesh.tp_group)
    stacked = stacked.view(mesh.tp_size, *padded.shape)
    full = local.new_zeros((spec.full, *local.shape[1:]))
    for rank, (start, size) in enumerate(ranges):
        full[start : start + size] = stacked[rank, :size]
    return full.movedim(0, spec.dim).contiguous()


def full_parameters(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Every parameter of `model`, reassembled to its full (dense) shape. Collective over tp.
    Vocabulary padding is kept (it is part of the parameter)."""
    return {name: gather_full(p, shard_spec(p), mesh) for name, p in model.named_parameters()}


def full_gradients(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, reassembled to its full shape (None grads become zeros)."""
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = gather_full(grad, shard_spec(p), mesh)
    return out
