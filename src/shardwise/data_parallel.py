"""Data parallelism beside tensor parallelism: average gradients over the dp group after backward.

One flat all-reduce per call (grads packed into one buffer) rather than one per parameter: on gloo
each collective costs a ~0.1-0.3 ms latency floor. It goes through comm like every tensor-parallel collective,
so the profiler sees it (tag "dp_grad_sync", group_size = dp)."""

from __future__ import annotations

import torch

from . import comm
from .mesh import Mesh


def average_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    """grad <- mean over the dp ranks of grad, for every parameter that has one."""
    if mesh.dp_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_(flat, mesh, "dp_grad_sync", "bwd", group="dp")
    flat /= mesh.dp_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
