"""Preflight: before the first step, every rank shows the others its config and its parameters' shard
shapes; any disagreement raises on every rank, naming the field and the ranks, instead of hanging in a
collective whose sizes do not match (or silently computing nonsense)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import Mesh
from .sharding import shard_spec


class PreflightError(ValueError):
    pass


def fingerprint(model: torch.nn.Module, mesh: Mesh, config: dict | None = None) -> dict:
    params = {}
    for name, p in model.named_parameters():
        spec = shard_spec(p)
        params[name] = {"shape": list(p.shape), "dtype": str(p.dtype), "full": spec.full if spec else None,
                        "dim": spec.dim if spec else None}  # fmt: skip
    return {"tp": mesh.tp_size, "dp": mesh.dp_size, "tp_rank": mesh.tp_rank, "config": config or {}, "params": params}


def _differences(a: dict, b: dict, same_tp_rank: bool) -> list[str]:
    out = [f"{key}: {a[key]!r} vs {b[key]!r}" for key in ("tp", "dp") if a[key] != b[key]]
    for key in sorted(set(a["config"]) | set(b["config"])):
        if a["config"].get(key) != b["config"].get(key):
            out.append(f"config.{key}: {a['config'].get(key)!r} vs {b['config'].get(key)!r}")
    names_a, names_b = set(a["params"]), set(b["params"])
    for name in sorted(names_a ^ names_b):
        out.append(f"parameter {name!r} exists on only one of them")
    for name in sorted(names_a & names_b):
        pa, pb = a["params"][name], b["params"][name]
        # Ranks at the same tp position hold the same shard; any two ranks agree on full sizes and dtypes.
        fields = ("shape", "dtype", "full", "dim") if same_tp_rank else ("dtype", "full", "dim")
        for field in fields:
            if pa[field] != pb[field]:
                out.append(f"{name}.{field}: {pa[field]} vs {pb[field]}")
    return out


def preflight(model: torch.nn.Module, mesh: Mesh, config: dict | None = None) -> None:
    """Collective over the whole world: raises PreflightError on every rank if any two ranks differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = fingerprint(model, mesh, config)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    problems = []
    for rank, other in enumerate(every[1:], start=1):
        diffs = _differences(every[0], other, every[0]["tp_rank"] == other["tp_rank"])
        if not diffs and other["tp_rank"] != every[0]["tp_rank"]:
            # compare shard shapes with the first rank at the same tp position
            peer = next(i for i, f in enumerate(every) if f["tp_rank"] == other["tp_rank"])
            diffs = _differences(every[peer], other, True)
            rank0 = peer
        else:
            rank0 = 0
        problems += [f"rank {rank0} vs rank {rank}: {d}" for d in diffs[:5]]
    if problems:
        raise PreflightError("ranks disagree before training (fix the config or launch so every rank builds the same "
                             "model):\n  " + "\n  ".join(problems[:12]))  # fmt: skip
