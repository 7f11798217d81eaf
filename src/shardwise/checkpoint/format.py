"""Sharded checkpoints that load at any tp degree.

Every tp rank writes its own shards to one safetensors file, so a save never gathers a full tensor.
An index (JSON) records, for each state_dict tensor, its dense shape, how it was sharded and which
file holds which rows; loading reads, lazily, just the rows the loading rank's own ShardSpec asks
for, from whichever files hold them. That is why a checkpoint saved at tp=2 loads at tp=1, 3 or 4.

Layout of a checkpoint directory:

    index.json                                   written last; the checkpoint exists once it does
    shards-<save_id>/rank-00000-of-00002.safetensors
    shards-<save_id>/rank-00001-of-00002.safetensors

Overwriting a checkpoint is crash-safe: a save puts its shards in a fresh `shards-<save_id>` folder
(the old index never points there), replaces index.json atomically once every shard is on disk, and
only then deletes the old shards folder. A save that dies at any point leaves the old index and the
old shards it names intact; the orphaned folder it leaves is deleted by the next save that completes.

Index format (version 2):

    {"format": "shardwise-checkpoint", "version": 2, "save_id": str, "tp_size": int,
     "shard_dir": "shards-<save_id>", "files": [relative paths, tp rank order],
     "file_bytes": [size of each file in bytes, same order],
     "extra": the caller's JSON-able dict or null,
     "keys": [every state_dict key, in state_dict order, aliases included],
     "aliases": {name: canonical name},      # tied parameters: stored once, under the canonical name
     "tensors": {name: {
         "dtype": "float32", "shape": [dense full shape, padding removed],
         "dim": sharded dim or null, "specs": [ShardSpec.to_json() per tp rank] or null (unsharded),
         "layout": the parameter's ShardInfo.layout hint or null (used by `reshard`),
         "transposed": the parameter's ShardInfo.transposed (the dense model stores it transposed, e.g.
                       transformers' Conv1D [in, out]; consolidate transposes it back),
         "pieces": [{"file": relative path, "ranges": [[start, stop], ...] or null,
                     "sha256": hex digest of the tensor's bytes as stored in that file}]}}}

A piece's ranges are dense coordinates along "dim" (padding past `valid` is never stored); the
tensor stored under `name` in that file is those ranges concatenated along "dim". ranges null: the
file holds the whole tensor. Ranges of different pieces may overlap (kv heads held by two ranks).

Integrity: a load checks every file's size against "file_bytes" (a truncated file fails before
anything is read) and every stored tensor it reads against its "sha256" (a flipped byte names the
file and the tensor), so damaged files raise CheckpointError instead of loading silently. Version 1
indexes (neither field) still load, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..sharding import ShardSpec

FORMAT = "shardwise-checkpoint"
VERSION = 2  # 2: per-tensor sha256 and per-file sizes; version 1 indexes still load, unverified
INDEX = "index.json"
SHARD_PREFIX = "shards-"
_INDEX_TMP_PREFIX = f".{INDEX}.tmp-"


class CheckpointError(ValueError):
    """A checkpoint's files are damaged (truncated, corrupt header, bytes that fail their checksum) or
    mix two saves; the message names the file (and the tensor)."""


@dataclass
class LoadResult:
    """What load_sharded did: keys left untouched (strict=False only) and the caller's `extra`."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    extra: dict | None = None


# --------------------------------------------------------------------------------------------- files


def shard_file_name(tp_rank: int, tp_size: int) -> str:
    return f"rank-{tp_rank:05d}-of-{tp_size:05d}.safetensors"


def new_save_id() -> str:
    return uuid.uuid4().hex[:16]


def fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is: fsync the folder too (POSIX; a no-op elsewhere).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_shard_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_index(directory: Path, index: dict) -> None:
    text = json.dumps(index, indent=1)
    atomic_write(directory / INDEX, lambda tmp: tmp.write_text(text))


def remove_stale(directory: Path, keep: str) -> None:
    """Delete shard folders no index names any more (the one replaced, and orphans of saves that died)
    and temp files of dead index writes. Only our own names are touched."""
    for entry in directory.iterdir():
        if entry.name.startswith(SHARD_PREFIX) and entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(_INDEX_TMP_PREFIX):
            entry.unlink(missing_ok=True)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, native little-endian)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"checkpoint index names an unknown dtype {name!r}")
    return dtype


def read_index(directory: str | os.PathLike) -> dict:
    """The checkpoint's index (format above); `read_index(d)["extra"]` is what the saver passed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist; pass the directory save_sharded wrote to"
        )
    path = directory / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no checkpoint: {INDEX} is missing. save_sharded writes it last, so a save "
            "that never finished leaves none; pass a directory a completed save_sharded wrote"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint index is damaged") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f'{path} is not a shardwise checkpoint index (no "format": "{FORMAT}")')
    if not isinstance(index.get("version"), int) or index["version"] > VERSION:
        raise ValueError(
            f"{path} has format version {index.get('version')!r}, this shardwise reads up to {VERSION}: "
            "upgrade shardwise"
        )
    return index


def real_ranges(spec: ShardSpec) -> list[tuple[int, int, int]]:
    """(start, stop, offset in the local tensor) of each range, clipped to the real (unpadded) entries."""
    valid = spec.full if spec.valid is None else spec.valid
    out, offset = [], 0
    for start, stop in spec.ranges:
        if min(stop, valid) > start:
            out.append((start, min(stop, valid), offset))
        offset += stop - start
    return out


def build_index(manifests: list[dict], save_id: str, shard_dir: str, extra: dict | None) -> dict:
    """Merge the per-tp-rank manifests (tp rank order) into the index. A manifest: {"tp_rank", "file",
    "bytes" (its size), "order", "keys", "aliases", "tensors": {name: {"dtype", "shape", "spec", "layout",
    "transposed", "ranges", "stored", "sha256"}}}."""
    first = manifests[0]
    for m in manifests[1:]:
        if m["order"] != first["order"] or m["aliases"] != first["aliases"]:
            raise ValueError(
                f"tp ranks 0 and {m['tp_rank']} hold different state_dict keys or ties: every rank must save "
                "the same model"
            )
    tensors = {}
    for name in first["order"]:
        metas = [m["tensors"][name] for m in manifests]
        head = metas[0]
        for other in metas[1:]:
            if (other["shape"], other["dtype"]) != (head["shape"], head["dtype"]):
                raise ValueError(
                    f"{name}: tp ranks disagree on its full shape/dtype ({head['shape']} {head['dtype']} vs "
                    f"{other['shape']} {other['dtype']}); every rank must save the same model"
                )
        sharded = head["spec"] is not None
        tensors[name] = {
            "dtype": head["dtype"],
            "shape": head["shape"],
            "dim": head["spec"]["dim"] if sharded else None,
            "specs": [meta["spec"] for meta in metas] if sharded else None,
            "layout": head["layout"],
            "transposed": head["transposed"],
            "pieces": [{"file": m["file"], "ranges": meta["ranges"], "sha256": meta["sha256"]}
                       for m, meta in zip(manifests, metas, strict=True) if meta["stored"]],
        }  # fmt: skip
    return {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "tp_size": len(manifests),
        "shard_dir": shard_dir,
        "files": [m["file"] for m in manifests],
        "file_bytes": [m["bytes"] for m in manifests],
        "extra": extra,
        "keys": first["keys"],
        "aliases": first["aliases"],
        "tensors": tensors,
    }
