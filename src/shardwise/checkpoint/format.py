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

Index format (version 1):

    {"format": "shardwise-checkpoint", "version": 1, "save_id": str, "tp_size": int,
     "shard_dir": "shards-<save_id>", "files": [relative paths, tp rank order],
     "extra": the caller's JSON-able dict or null,
     "keys": [every state_dict key, in state_dict order, aliases included],
     "aliases": {name: canonical name},      # tied parameters: stored once, under the canonical name
     "tensors": {name: {
         "dtype": "float32", "shape": [dense full shape, padding removed],
         "dim": sharded dim or null, "specs": [ShardSpec.to_json() per tp rank] or null (unsharded),
         "layout": the parameter's ShardInfo.layout hint or null (used by `reshard`),
         "transposed": the parameter's ShardInfo.transposed (the dense model stores it transposed, e.g.
                       transformers' Conv1D [in, out]; consolidate transposes it back),
         "pieces": [{"file": relative path, "ranges": [[start, stop], ...] or null}]}}}

A piece's ranges are dense coordinates along "dim" (padding past `valid` is never stored); the
tensor stored under `name` in that file is those ranges concatenated along "dim". ranges null: the
file holds the whole tensor. Ranges of different pieces may overlap (kv heads held by two ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..sharding import ShardSpec

FORMAT = "shardwise-checkpoint"
VERSION = 1
INDEX = "index.json"
SHARD_PREFIX = "shards-"
_INDEX_TMP_PREFIX = f".{INDEX}.tmp-"


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
    if index.get("version", 0) > VERSION:
        raise ValueError(
            f"{path} has format version {index['version']}, this shardwise reads up to {VERSION}: upgrade shardwise"
        )
    return index


class Reader:
    """Reads any box of any saved tensor, lazily (safetensors slices), from the files that hold it."""

    def __init__(self, directory: Path, index: dict):
        self.directory, self.index = Path(directory), index
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def check_files(self) -> None:
        """Fail before anything is loaded if a file the index names is gone: every rank checks every
        file, so all ranks fail alike instead of some loading and some not."""
        for rel in self.index["files"]:
            path = self.directory / rel
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {self.directory} is incomplete: {path} (named by {INDEX}) is missing; "
                    "restore it or save the checkpoint again"
                )

    def _open(self, rel: str):
        if rel not in self._handles:
            path = self.directory / rel
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {self.directory} is incomplete: {path} (named by {INDEX}) is missing; "
                    "restore it or save the checkpoint again"
                )
            handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            saved_by = (handle.metadata() or {}).get("save_id")
            if saved_by != self.index["save_id"]:
                raise ValueError(
                    f"{path} was written by save {saved_by!r}, but {INDEX} is from save {self.index['save_id']!r}: "
                    "the directory mixes two checkpoints; save it again"
                )
            self._handles[rel] = handle
            self._keys[rel] = set(handle.keys())
        return self._handles[rel]

    def _slice(self, rel: str, name: str, box: list[tuple[int, int]]) -> torch.Tensor:
        handle = self._open(rel)
        if name not in self._keys[rel]:
            raise ValueError(f"{self.directory / rel} does not hold {name!r} although {INDEX} says it does")
        if not box:  # a 0-dim tensor
            return handle.get_tensor(name)
        return handle.get_slice(name)[tuple(slice(lo, hi) for lo, hi in box)]

    def read(self, name: str, box: list[tuple[int, int]]) -> torch.Tensor:
        """dense[name][box]: box is one [lo, hi) per dim of the dense (unpadded) tensor."""
        entry = self.index["tensors"][name]
        shape = [hi - lo for lo, hi in box]
        if any(size == 0 for size in shape):
            return torch.empty(shape, dtype=dtype_of(entry["dtype"]))
        whole = [piece for piece in entry["pieces"] if piece["ranges"] is None]
        if whole:
            return self._slice(whole[0]["file"], name, box)
        dim = entry["dim"]
        segments = []  # (start, stop, file, offset of start in that file's tensor)
        for piece in entry["pieces"]:
            offset = 0
            for start, stop in piece["ranges"]:
                segments.append((start, stop, piece["file"], offset))
                offset += stop - start
        lo, hi = box[dim]
        parts, cur = [], lo
        while cur < hi:
            covering = [seg for seg in segments if seg[0] <= cur < seg[1]]
            if not covering:
                raise ValueError(
                    f"checkpoint {self.directory} is incomplete: no file holds {name}[{cur}] along dim {dim}; "
                    "save the checkpoint again"
                )
            start, stop, rel, offset = max(covering, key=lambda seg: seg[1])  # fewest reads
            stop = min(stop, hi)
            local = list(box)
            local[dim] = (offset + cur - start, offset + stop - start)
            parts.append(self._slice(rel, name, local))
            cur = stop
        return torch.cat(parts, dim) if len(parts) > 1 else parts[0]

    def read_full(self, name: str) -> torch.Tensor:
        return self.read(name, [(0, n) for n in self.index["tensors"][name]["shape"]])

    def read_shard(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        """The local tensor a parameter with ShardSpec `spec` holds: its ranges of the dense tensor,
        zeros where a range runs past `valid` (padding, whatever tp the checkpoint was saved at)."""
        if spec is None:
            return self.read_full(name)
        shape = self.index["tensors"][name]["shape"]
        valid = spec.full if spec.valid is None else spec.valid
        parts = []
        for start, stop in spec.ranges:
            real_stop = min(stop, valid)
            if real_stop > start:
                box = [(0, n) for n in shape]
                box[spec.dim] = (start, real_stop)
                parts.append(self.read(name, box))
            padding = stop - max(start, valid)
            if padding > 0:
                pad_shape = list(shape)
                pad_shape[spec.dim] = padding
                parts.append(torch.zeros(pad_shape, dtype=dtype_of(self.index["tensors"][name]["dtype"])))
        return torch.cat(parts, spec.dim) if len(parts) > 1 else parts[0]


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
    """Merge the per-tp-rank manifests (tp rank order) into the index."""
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
            "pieces": [{"file": m["file"], "ranges": meta["ranges"]}
                       for m, meta in zip(manifests, metas, strict=True) if meta["stored"]],
        }  # fmt: skip
    return {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "tp_size": len(manifests),
        "shard_dir": shard_dir,
        "files": [m["file"] for m in manifests],
        "extra": extra,
        "keys": first["keys"],
        "aliases": first["aliases"],
        "tensors": tensors,
    }
