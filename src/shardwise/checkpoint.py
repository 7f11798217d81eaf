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
         "layout": the parameter's `tp_layout` hint or null (used by `reshard`),
         "transposed": the parameter's `tp_transposed` (the dense model stores it transposed, e.g.
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
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .heads import head_layout
from .mesh import Mesh, get_mesh
from .sharding import ShardSpec, balanced_range, shard_spec

__all__ = ["LoadResult", "consolidate", "load_sharded", "read_index", "reshard", "save_sharded"]

FORMAT = "shardwise-checkpoint"
VERSION = 1
INDEX = "index.json"
_SHARD_PREFIX = "shards-"
_INDEX_TMP_PREFIX = f".{INDEX}.tmp-"


@dataclass
class LoadResult:
    """What load_sharded did: keys left untouched (strict=False only) and the caller's `extra`."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    extra: dict | None = None


# --------------------------------------------------------------------------------------------- files


def _shard_file_name(tp_rank: int, tp_size: int) -> str:
    return f"rank-{tp_rank:05d}-of-{tp_size:05d}.safetensors"


def _new_save_id() -> str:
    return uuid.uuid4().hex[:16]


def _fsync_dir(path: Path) -> None:
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


def _atomic_write(path: Path, write) -> None:
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
    _fsync_dir(path.parent)


def _write_shard_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_index(directory: Path, index: dict) -> None:
    text = json.dumps(index, indent=1)
    _atomic_write(directory / INDEX, lambda tmp: tmp.write_text(text))


def _remove_stale(directory: Path, keep: str) -> None:
    """Delete shard folders no index names any more (the one replaced, and orphans of saves that died)
    and temp files of dead index writes. Only our own names are touched."""
    for entry in directory.iterdir():
        if entry.name.startswith(_SHARD_PREFIX) and entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(_INDEX_TMP_PREFIX):
            entry.unlink(missing_ok=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
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


class _Reader:
    """Reads any box of any saved tensor, lazily (safetensors slices), from the files that hold it."""

    def __init__(self, directory: Path, index: dict):
        self.directory, self.index = Path(directory), index
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}

    def __enter__(self) -> _Reader:
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
            return torch.empty(shape, dtype=_dtype(entry["dtype"]))
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
                parts.append(torch.zeros(pad_shape, dtype=_dtype(self.index["tensors"][name]["dtype"])))
        return torch.cat(parts, spec.dim) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------------------------- save


def _mesh_of(model: torch.nn.Module, mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        return mesh
    own = getattr(model, "mesh", None)
    return own if isinstance(own, Mesh) else get_mesh()


def _real_ranges(spec: ShardSpec) -> list[tuple[int, int, int]]:
    """(start, stop, offset in the local tensor) of each range, clipped to the real (unpadded) entries."""
    valid = spec.full if spec.valid is None else spec.valid
    out, offset = [], 0
    for start, stop in spec.ranges:
        if min(stop, valid) > start:
            out.append((start, min(stop, valid), offset))
        offset += stop - start
    return out


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
        spec = shard_spec(value)
        layout = getattr(value, "tp_layout", None)
        transposed = bool(getattr(value, "tp_transposed", False))
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
            real = _real_ranges(spec)
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
            "dtype": _dtype_name(value.dtype),
            "shape": shape,
            "spec": None if spec is None else spec.to_json(),
            "layout": layout,
            "transposed": transposed,
            "ranges": ranges,
            "stored": stored is not None,
        }
    manifest = {"tp_rank": mesh.tp_rank, "file": file_rel, "order": [n for n, _ in items], "tensors": meta,
                "aliases": aliases, "keys": list(model.state_dict(keep_vars=True)), "error": None}  # fmt: skip
    return manifest, tensors


def _build_index(manifests: list[dict], save_id: str, shard_dir: str, extra: dict | None) -> dict:
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
    save_id = _broadcast(_new_save_id()) if distributed else _new_save_id()
    shard_dir = _SHARD_PREFIX + save_id
    manifest, local_error = None, None
    if mesh.dp_rank == 0:  # dp replicas hold the same values: one copy is enough
        file_rel = f"{shard_dir}/{_shard_file_name(mesh.tp_rank, mesh.tp_size)}"
        try:
            manifest, tensors = _rank_manifest(model, mesh, file_rel)
            (directory / shard_dir).mkdir(parents=True, exist_ok=True)
            metadata = {"format": "pt", "save_id": save_id, "tp_rank": str(mesh.tp_rank), "tp_size": str(mesh.tp_size)}
            _write_shard_file(directory / file_rel, tensors, metadata)
            _fsync_dir(directory / shard_dir)
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
                _write_index(directory, _build_index(manifests, save_id, shard_dir, extra))
                _remove_stale(directory, shard_dir)
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
    ShardSpec (zeros past `valid`), reading only those rows from the files. Not collective: each rank
    reads what it needs. Everything (keys, shapes, files) is checked before anything is written, so a
    failed load leaves the model unchanged. strict=False loads the keys both sides have and reports
    the rest in the result. `mesh` only names this rank in errors.
    """
    mesh = _mesh_of(model, mesh)
    directory = Path(directory)
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
    with _Reader(directory, index) as reader:
        reader.check_files()
        with torch.no_grad():
            for value, source, spec in plan:
                local = reader.read_shard(source, spec)
                value.copy_(local)  # casts if the model's dtype differs from the saved one
    return LoadResult(missing if not strict else [], unexpected if not strict else [], index.get("extra"))


# ------------------------------------------------------------------------------------------- offline


def consolidate(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state_dict of a checkpoint, offline (no process group): every tensor at its full
    shape with vocabulary padding stripped, in the dense model's layout (tensors saved with
    `tp_transposed` transposed back), tied names mapping to the same tensor. Holds the whole model
    in memory."""
    directory = Path(directory)
    index = read_index(directory)
    tensors = {}
    with _Reader(directory, index) as reader:
        reader.check_files()
        for name, entry in index["tensors"].items():
            tensors[name] = reader.read_full(name)
            if entry.get("transposed"):
                tensors[name] = tensors[name].t().contiguous()
    aliases = index["aliases"]
    return {name: tensors[aliases.get(name, name)] for name in index["keys"]}


def _spec_rule(name: str, entry: dict):
    """A function (tp, rank) -> ShardSpec giving `name`'s layout at any tp, or an error if the index
    does not say enough to derive it."""
    old = [ShardSpec.from_json(s) for s in entry["specs"]]
    dim, shape = old[0].dim, entry["shape"]
    hint = entry.get("layout")
    if hint is not None:
        return _hint_rule(name, hint)
    if old[0].valid is not None:  # a padded vocabulary: padded to a multiple of tp, equal contiguous rows
        valid = old[0].valid

        def padded(tp: int, rank: int) -> ShardSpec:
            rows = -(-valid // tp)
            return ShardSpec(dim, ((rank * rows, (rank + 1) * rows),), rows * tp, False, valid)

        return padded
    if all(len(s.ranges) == 1 and not s.replicated for s in old):
        full = shape[dim]

        def balanced(tp: int, rank: int) -> ShardSpec:
            if full < tp:
                raise ValueError(f"cannot reshard {name}: {full} entries along dim {dim} cannot be split over tp={tp}")
            return ShardSpec(dim, (balanced_range(full, tp, rank),), full)

        return balanced
    what = "replicated (shared by ranks)" if any(s.replicated for s in old) else "split into several ranges"
    raise ValueError(
        f"cannot reshard {name}: its shards are {what}, and the checkpoint has no layout hint saying how they "
        "are laid out at another tp. Set param.tp_layout (e.g. {'kind': 'heads', 'num_heads': ..., "
        "'num_kv_heads': ..., 'head_dim': ..., 'role': 'q' | 'kv' | 'o'}) and save again; loading this "
        "checkpoint with load_sharded at any tp works without it"
    )


def _hint_rule(name: str, hint: dict):
    kind = hint.get("kind")
    try:
        num_heads, num_kv_heads, d = int(hint["num_heads"]), int(hint["num_kv_heads"]), int(hint["head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: layout hint {hint} needs integer num_heads, num_kv_heads, head_dim") from exc

    def layout(tp: int, rank: int):
        try:
            return head_layout(num_heads, num_kv_heads, tp, rank)
        except ValueError as exc:
            raise ValueError(f"cannot reshard {name} to tp={tp}: {exc}") from exc

    if kind == "heads":
        role = hint.get("role")
        if role not in ("q", "kv", "o"):
            raise ValueError(f"{name}: layout hint {hint} needs role 'q', 'kv' or 'o'")
        dim = int(hint.get("dim", 1 if role == "o" else 0))
        expand_kv = bool(hint.get("expand_kv", False))

        def heads(tp: int, rank: int) -> ShardSpec:
            lay = layout(tp, rank)
            if role != "kv":
                return ShardSpec(dim, ((lay.q_start * d, lay.q_stop * d),), num_heads * d)
            ranges = ((lay.kv_start * d, lay.kv_stop * d),)
            replicated = lay.kv_shared
            if expand_kv:  # parallelize's Heads(expand_kv=True): one kv head per local q head where a group is cut
                if lay.uniform_repeat is None:
                    ranges = tuple(((lay.kv_start + k) * d, (lay.kv_start + k + 1) * d) for k in lay.kv_index)
                replicated = replicated or any(layout(tp, r).uniform_repeat is None for r in range(tp))
            return ShardSpec(dim, ranges, num_kv_heads * d, replicated)

        return heads
    if kind == "fused_qkv":  # [q | k | v] stacked along dim
        dim = int(hint.get("dim", 0))
        k0, v0 = num_heads * d, (num_heads + num_kv_heads) * d

        def fused(tp: int, rank: int) -> ShardSpec:
            lay = layout(tp, rank)
            kv = (lay.kv_start * d, lay.kv_stop * d)
            ranges = ((lay.q_start * d, lay.q_stop * d), (k0 + kv[0], k0 + kv[1]), (v0 + kv[0], v0 + kv[1]))
            return ShardSpec(dim, ranges, (num_heads + 2 * num_kv_heads) * d, lay.kv_shared)

        return fused
    raise ValueError(f"{name}: unknown layout hint kind {kind!r} (expected 'heads' or 'fused_qkv')")


def _same_rows(a: ShardSpec, b: ShardSpec) -> bool:
    """Whether two specs select the same rows in the same order: ranges that merely touch are merged
    ((0, 4), (4, 8) is (0, 8): a fused q|k|v at tp=1 may be either). `replicated` follows from the rows."""

    def merged(ranges):
        out = []
        for start, stop in ranges:
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], stop)
            else:
                out.append((start, stop))
        return out

    return (a.dim, a.full, a.valid, merged(a.ranges)) == (b.dim, b.full, b.valid, merged(b.ranges))


def _plan_reshard(name: str, entry: dict, old_tp: int, tp: int) -> list[ShardSpec]:
    rule = _spec_rule(name, entry)
    saved = [ShardSpec.from_json(s) for s in entry["specs"]]
    # The rule must reproduce the layout actually saved: else it is not the rule this tensor follows
    # (a stale or wrong hint, or an uneven head split saved without a hint) and its output would be too.
    derived = [rule(old_tp, rank) for rank in range(old_tp)]
    if not all(_same_rows(x, y) for x, y in zip(derived, saved, strict=True)):
        raise ValueError(
            f"cannot reshard {name}: the layout rule for it (hint {entry.get('layout')}) gives {derived} at the "
            f"saved tp={old_tp}, but the checkpoint holds {saved}; set a correct param.tp_layout and save again"
        )
    new = [rule(tp, rank) for rank in range(tp)]
    full = entry["shape"][new[0].dim]
    if (new[0].valid if new[0].valid is not None else new[0].full) != full:
        raise ValueError(f"cannot reshard {name}: its layout hint implies size {new[0].full}, the tensor has {full}")
    return new


def reshard(dir_in: str | os.PathLike, dir_out: str | os.PathLike, tp: int) -> None:
    """Rewrite the checkpoint in `dir_in` as one saved at tp degree `tp`, in `dir_out`, offline.

    Each new rank's file holds exactly the shards a model built at `tp` holds, so loading it reads one
    file per rank. The layout at the new tp comes from the index: a balanced split for single-range
    tensors, equal rows of the re-padded table for padded ones (`valid`), and the `layout` hint for
    attention heads (multi-range or replicated shards need one). All layouts are worked out before
    anything is written. Holds one new rank's shards in memory at a time. dir_out may equal dir_in
    (the swap is crash-safe as for save_sharded)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    dir_in, dir_out = Path(dir_in), Path(dir_out)
    index = read_index(dir_in)
    old_tp = index["tp_size"]
    plans = {
        name: (None if entry["specs"] is None else _plan_reshard(name, entry, old_tp, tp))
        for name, entry in index["tensors"].items()
    }
    save_id = _new_save_id()
    shard_dir = _SHARD_PREFIX + save_id
    (dir_out / shard_dir).mkdir(parents=True, exist_ok=True)
    manifests = []
    with _Reader(dir_in, index) as reader:
        reader.check_files()
        for rank in range(tp):
            file_rel = f"{shard_dir}/{_shard_file_name(rank, tp)}"
            tensors, meta = {}, {}
            for name, entry in index["tensors"].items():
                spec = None if plans[name] is None else plans[name][rank]
                if spec is None:
                    ranges = None
                    stored = reader.read_full(name) if rank == 0 else None
                else:
                    real = _real_ranges(spec)
                    ranges = [[start, stop] for start, stop, _ in real]
                    real_spec = ShardSpec(spec.dim, tuple((start, stop) for start, stop, _ in real), spec.full)
                    stored = reader.read_shard(name, real_spec) if real else None
                if stored is not None:
                    tensors[name] = stored.contiguous()
                meta[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                              "spec": None if spec is None else spec.to_json(), "layout": entry.get("layout"),
                              "transposed": entry.get("transposed", False), "ranges": ranges,
                              "stored": stored is not None}  # fmt: skip
            metadata = {"format": "pt", "save_id": save_id, "tp_rank": str(rank), "tp_size": str(tp)}
            _write_shard_file(dir_out / file_rel, tensors, metadata)
            del tensors
            manifests.append({"tp_rank": rank, "file": file_rel, "order": list(index["tensors"]), "tensors": meta,
                              "aliases": index["aliases"], "keys": index["keys"], "error": None})  # fmt: skip
        _fsync_dir(dir_out / shard_dir)
        _write_index(dir_out, _build_index(manifests, save_id, shard_dir, index.get("extra")))
    _remove_stale(dir_out, shard_dir)
