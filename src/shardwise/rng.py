"""Random streams for dropout under tensor parallelism.

Two streams per process:
- torch's default generator, identical on every tp rank (seed it the same everywhere): for tensors
  that are replicated across tp ranks, whose dropout masks must agree;
- a tp stream, different on each tp rank: for tensors that are sharded across tp ranks (local
  attention heads, a sequence-parallel token shard), whose masks must differ or the shards would
  share one mask pattern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mesh import Mesh

_TP_SEED_OFFSET = 2718  # keeps the tp stream apart from the default stream seeded with the same seed

_tp_generators: dict[tuple[str, int], torch.Generator] = {}
_tp_seed: dict[str, int] = {}


def manual_seed(seed: int, mesh: Mesh) -> None:
    """Seed the default stream with `seed` (same on all ranks) and this rank's tp stream."""
    torch.manual_seed(seed)
    _tp_generators.clear()
    _tp_seed["seed"] = seed + _TP_SEED_OFFSET + mesh.tp_rank


def tp_generator(mesh: Mesh, device: torch.device) -> torch.Generator:
    key = (device.type, device.index or 0)
    gen = _tp_generators.get(key)
    if gen is None:
        seed = _tp_seed.get("seed", torch.initial_seed() + _TP_SEED_OFFSET + mesh.tp_rank)
        gen = torch.Generator(device=device).manual_seed(seed)
        _tp_generators[key] = gen
    return gen


def dropout(x: torch.Tensor, p: float, training: bool, mesh: Mesh, sharded: bool) -> torch.Tensor:
    """Dropout drawing from the tp stream when `x` is sharded across tp ranks, else the default one."""
    if not training or p == 0.0:
        return x
    if not sharded or mesh.tp_size == 1:
        return F.dropout(x, p, training=True)
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=tp_generator(mesh, x.device))
    return x * keep / (1.0 - p)
