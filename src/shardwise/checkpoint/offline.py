"""Offline, without any process group: consolidate a checkpoint into the dense state_dict, or rewrite it for
another tp degree."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..heads import spec_from_hint
from ..sharding import ShardSpec, balanced_range
from .format import (
    SHARD_PREFIX,
    build_index,
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

__all__ = ["consolidate", "reshard"]


def consolidate(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state_dict of a checkpoint, offline (no process group): every tensor at its full
    shape with vocabulary padding stripped, in the dense model's layout (tensors saved with
    ShardInfo.transposed transposed back), tied names mapping to the same tensor. Holds the whole model
    in memory."""
    directory = Path(directory)
    index = read_index(directory)
    tensors = {}
    with Reader(directory, index) as reader:
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
        try:
            return _hint_rule(name, hint)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
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
        "are laid out at another tp. Give the parameter a layout hint (shardwise.sharding.set_shard_info(param, "
        "layout=shardwise.heads.layout_hint('heads', num_heads, num_kv_heads, head_dim, role='q' | 'kv' | 'o'))) "
        "and save again; loading this "
        "checkpoint with load_sharded at any tp works without it"
    )


def _hint_rule(name: str, hint: dict):
    spec_from_hint(hint, 1, 0)  # a malformed hint fails here, naming the tensor below

    def rule(tp: int, rank: int) -> ShardSpec:
        try:
            return spec_from_hint(hint, tp, rank)
        except ValueError as exc:
            raise ValueError(f"cannot reshard {name} to tp={tp}: {exc}") from exc

    return rule


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
            f"saved tp={old_tp}, but the checkpoint holds {saved}; set a correct layout hint "
            "(sharding.set_shard_info) and save again"
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
    save_id = new_save_id()
    shard_dir = SHARD_PREFIX + save_id
    (dir_out / shard_dir).mkdir(parents=True, exist_ok=True)
    manifests = []
    with Reader(dir_in, index) as reader:
        reader.check_files()
        for rank in range(tp):
            file_rel = f"{shard_dir}/{shard_file_name(rank, tp)}"
            tensors, meta = {}, {}
            for name, entry in index["tensors"].items():
                spec = None if plans[name] is None else plans[name][rank]
                if spec is None:
                    ranges = None
                    stored = reader.read_full(name) if rank == 0 else None
                else:
                    real = real_ranges(spec)
                    ranges = [[start, stop] for start, stop, _ in real]
                    real_spec = ShardSpec(spec.dim, tuple((start, stop) for start, stop, _ in real), spec.full)
                    stored = reader.read_shard(name, real_spec) if real else None
                if stored is not None:
                    tensors[name] = stored.contiguous()
                meta[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                              "spec": None if spec is None else spec.to_json(), "layout": entry.get("layout"),
                              "transposed": entry.get("transposed", False), "ranges": ranges,
                              "stored": stored is not None,
                              "sha256": None if stored is None else tensor_digest(stored)}  # fmt: skip
            metadata = {"format": "pt", "save_id": save_id, "tp_rank": str(rank), "tp_size": str(tp)}
            write_shard_file(dir_out / file_rel, tensors, metadata)
            del tensors
            manifests.append({"tp_rank": rank, "file": file_rel, "bytes": (dir_out / file_rel).stat().st_size,
                              "order": list(index["tensors"]), "tensors": meta,
                              "aliases": index["aliases"], "keys": index["keys"], "error": None})  # fmt: skip
        fsync_dir(dir_out / shard_dir)
        write_index(dir_out, build_index(manifests, save_id, shard_dir, index.get("extra")))
    remove_stale(dir_out, shard_dir)
