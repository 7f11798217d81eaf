"""The collective save and load: every tp rank writes its own shards, every rank reads just the rows its
own parameters hold (file layout and index: checkpoint/format.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..mesh import Mesh, get_mesh
from ..sharding import ShardSpec, shard_info, shard_spec
from .format import (
    INDEX,
    SHARD_PREFIX,
    CheckpointError,
    LoadResult,
    build_index,
    dtype_name,
    fsync_dir,
    new_save_id,
    read_index,
    real_ranges,
    remove_stale,
    shard_file_name,
    tensor_digest,
    write_index,
    write_shard_file,
)
from .reader import Reader

__all__ = ["LoadResult", "load_sharded", "read_index", "save_sharded"]


def _mesh_of(model: torch.nn.Module, mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        return mesh
    own = getattr(model, "mesh", None)
    return own if isinstance(own, Mesh) else get_mesh()


def _state_items(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """state_dict entries with tied ones split off: ([(name, tensor)], {alias: canonical name}), in
    state_dict order."""
    items, aliases, first = [], {}, {}
    for name, value in model.state_dict(keep_vars=True).items():  # persistent buffers included
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor: cannot save it")
        if id(value) in first:  # the same Parameter under two names (a tied head): store it once
            aliases[name] = first[id(value)]
            continue
        first[id(value)] = name
        items.append((name, value))
    return items, aliases


def _rank_manifest(model: torch.nn.Module, mesh: Mesh, file_rel: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """What this tp rank stores (tensors for its file) and what the index needs to know about it."""
    items, aliases = _state_items(model)
    tensors, meta = {}, {}
    for name, value in items:
        info = shard_info(value)
        spec, layout, transposed = info.spec, info.layout, bool(info.transposed)
        if layout is not None:
            json.dumps(layout)  # a hint that is not JSON-able fails here, on its own rank, before the index
        value = value.detach()
        shape = list(value.shape)
        if spec is None:
            stored = value if mesh.tp_rank == 0 else None  # replicated over tp: tp rank 0 speaks for all
            ranges = None
        else:
            if value.dim() <= spec.dim or value.shape[spec.dim] != spec.size:
                raise ValueError(
                    f"{name}: local shape {list(value.shape)} does not match its ShardSpec {spec} "
                    f"(expected {spec.size} entries along dim {spec.dim})"
                )
            shape[spec.dim] = spec.full if spec.valid is None else spec.valid
            real = real_ranges(spec)
            parts = [value.narrow(spec.dim, offset, stop - start) for start, stop, offset in real]
            stored = (torch.cat(parts, spec.dim) if len(parts) > 1 else parts[0]) if parts else None
            ranges = [[start, stop] for start, stop, _ in real]
        if stored is not None:
            stored = stored.to("cpu").contiguous()
            # safetensors refuses tensors sharing memory (views of one fused buffer): give those their own.
            if stored.numel() and any(stored.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                                      for t in tensors.values() if t.numel()):  # fmt: skip
                stored = stored.clone()
            tensors[name] = stored
        meta[name] = {
            "dtype": dtype_name(value.dtype),
            "shape": shape,
            "spec": None if spec is None else spec.to_json(),
            "layout": layout,
            "transposed": transposed,
            "ranges": ranges,
            "stored": stored is not None,
            "sha256": None if stored is None else tensor_digest(stored),
        }
    manifest = {"tp_rank": mesh.tp_rank, "file": file_rel, "order": [n for n, _ in items], "tensors": meta,
                "aliases": aliases, "keys": list(model.state_dict(keep_vars=True)), "error": None}  # fmt: skip
    return manifest, tensors


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(model: torch.nn.Module, directory: str | os.PathLike, mesh: Mesh | None = None,
                 extra: dict | None = None) -> None:  # fmt: skip
    """Save `model`'s state_dict as a sharded checkpoint in `directory` (created if needed).

    Collective: every rank of the mesh's world calls it (a Mesh.single() model: one process only).
    The dp_rank 0 ranks each write their tp shard (replicated tensors come from tp rank 0 only);
    global rank 0 writes the index last. `extra`: a JSON-able dict stored in the index (e.g. the
    model config), read back by `read_index(d)["extra"]`.
    Returns once the checkpoint is complete on every rank; on a failure every rank raises and the
    checkpoint previously in `directory` (if any) stays loadable.
    """
    mesh = _mesh_of(model, mesh)
    directory = Path(directory)
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-able (a dict of plain values), got {extra!r}: {exc}") from exc
    distributed = mesh.world_size > 1
    if distributed and not dist.is_initialized():
        raise ValueError(f"a mesh with tp={mesh.tp_size}, dp={mesh.dp_size} needs its process group: use init_mesh()")
    save_id = _broadcast(new_save_id()) if distributed else new_save_id()
    shard_dir = SHARD_PREFIX + save_id
    manifest, local_error = None, None
    if mesh.dp_rank == 0:  # dp replicas hold the same values: one copy is enough
        file_rel = f"{shard_dir}/{shard_file_name(mesh.tp_rank, mesh.tp_size)}"
        try:
            manifest, tensors = _rank_manifest(model, mesh, file_rel)
            (directory / shard_dir).mkdir(parents=True, exist_ok=True)
            metadata = {"format": "pt", "save_id": save_id, "tp_rank": str(mesh.tp_rank), "tp_size": str(mesh.tp_size)}
            write_shard_file(directory / file_rel, tensors, metadata)
            fsync_dir(directory / shard_dir)
            manifest["bytes"] = (directory / file_rel).stat().st_size
            del tensors
        except Exception as exc:  # reported to rank 0, so that no rank is left waiting in a collective
            manifest, local_error = {"tp_rank": mesh.tp_rank, "error": f"{type(exc).__name__}: {exc}"}, exc
    # The gather is the barrier that orders the index after the shards: a rank sends its manifest
    # only once its file is durably in place.
    if distributed:
        gathered = [None] * dist.get_world_size() if mesh.rank == 0 else None
        dist.gather_object(manifest, gathered, dst=0)
    else:
        gathered = [manifest]
    status = None
    if mesh.rank == 0:
        manifests = sorted((m for m in gathered if m is not None), key=lambda m: m["tp_rank"])
        errors = [f"tp rank {m['tp_rank']}: {m['error']}" for m in manifests if m["error"]]
        if errors:
            status = "; ".join(errors)
        else:
            try:
                # Old index -> new index in one rename; the old shards go only after it (see module doc).
                write_index(directory, build_index(manifests, save_id, shard_dir, extra))
                remove_stale(directory, shard_dir)
                status = "ok"
            except Exception as exc:
                status, local_error = f"rank 0 writing {INDEX}: {type(exc).__name__}: {exc}", exc
    # Second sync: nobody returns (and e.g. starts loading) before the index is in place.
    if distributed:
        status = _broadcast(status)
    if status != "ok":
        raise RuntimeError(
            f"save_sharded to {directory} failed ({status}); the checkpoint previously there, if any, is "
            "untouched. Fix the cause and save again"
        ) from local_error


# ---------------------------------------------------------------------------------------------- load


def _dense_shape(name: str, value: torch.Tensor, spec: ShardSpec | None) -> list[int]:
    shape = list(value.shape)
    if spec is not None:
        if value.dim() <= spec.dim or value.shape[spec.dim] != spec.size:
            raise ValueError(f"{name}: local shape {shape} does not match its ShardSpec {spec}")
        shape[spec.dim] = spec.full if spec.valid is None else spec.valid
    return shape


def _list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_sharded(model: torch.nn.Module, directory: str | os.PathLike, mesh: Mesh | None = None,
                 strict: bool = True) -> LoadResult:  # fmt: skip
    """Load a checkpoint written by save_sharded (at any tp) into `model` (built at any tp), in place.

    Each tensor's local values are cut from the saved dense tensor by the tensor's own current
    ShardSpec (zeros past `valid`), reading only the stored pieces holding those rows, each checked
    against its checksum. Everything (keys, shapes, files, checksums) is checked and read before anything
    is written, so a failed load leaves the model unchanged. strict=False loads the keys both sides have
    and reports the rest in the result.
    Collective when the model's mesh spans several processes (every rank of its world calls it): the
    ranks agree before any of them writes, so a file one rank finds damaged fails the load on every rank,
    naming the file, and no rank is left with weights its peers do not have.
    """
    mesh = _mesh_of(model, mesh)
    directory = Path(directory)
    loaded, result, error = [], None, None
    try:
        loaded, result = _read_local(model, directory, mesh, strict)
    except Exception as exc:
        error = exc
    if mesh.world_size > 1 and dist.is_initialized():
        mine = None if error is None else (type(error).__name__, str(error))
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, mine)
        if error is None:
            failed = [(rank, status) for rank, status in enumerate(statuses) if status is not None]
            if failed:
                rank, (kind, message) = failed[0]
                cls = CheckpointError if kind == CheckpointError.__name__ else RuntimeError
                raise cls(f"load_sharded from {directory} failed on rank {rank} ({kind}: {message}); "
                          "the model is unchanged on every rank")  # fmt: skip
    if error is not None:
        raise error
    with torch.no_grad():
        for value, local in loaded:
            value.copy_(local)  # casts if the model's dtype differs from the saved one
    return result


def _read_local(model: torch.nn.Module, directory: Path, mesh: Mesh, strict: bool):
    """Check the checkpoint against the model and read this rank's local tensors:
    ([(model tensor, its new local values)], LoadResult). Writes nothing."""
    index = read_index(directory)
    aliases = index["aliases"]
    saved = index["keys"]
    state = model.state_dict(keep_vars=True)
    missing = [name for name in state if name not in index["tensors"] and name not in aliases]
    unexpected = [name for name in saved if name not in state]
    if strict and (missing or unexpected):
        lines = [f"checkpoint {directory} does not match the model (strict=True):"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {_list(missing)}")
        if unexpected:
            lines.append(f"  in the checkpoint but not the model ({len(unexpected)}): {_list(unexpected)}")
        lines.append("build the model with the config the checkpoint was saved with "
                     "(read_index(dir)['extra']), or pass strict=False to load the common keys")  # fmt: skip
        raise ValueError("\n".join(lines))

    plan, seen, problems = [], set(), []
    for name, value in state.items():
        if name in missing or id(value) in seen:  # a tied tensor is filled once, through its first name
            continue
        seen.add(id(value))
        source = aliases.get(name, name)
        spec = shard_spec(value)
        entry = index["tensors"][source]
        shape = _dense_shape(name, value, spec)
        if shape != entry["shape"]:
            problems.append(f"  {name}: checkpoint full shape {tuple(entry['shape'])}, model full shape {tuple(shape)}")
        plan.append((value, source, spec))
    if problems:
        raise ValueError(
            f"shape mismatch loading {directory} (tp rank {mesh.tp_rank} of {mesh.tp_size}; shapes are dense, "
            "padding removed):\n" + "\n".join(problems) + "\nbuild the model with the saved config "
            "(read_index(dir)['extra'])"
        )
    with Reader(directory, index) as reader:
        reader.check_files()
        loaded = [(value, reader.read_shard(source, spec)) for value, source, spec in plan]
    result = LoadResult(missing if not strict else [], unexpected if not strict else [], index.get("extra"))
    return loaded, result
