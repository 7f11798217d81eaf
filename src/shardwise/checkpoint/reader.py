"""Reading a checkpoint's tensors, any box of any of them, from whichever files hold it; every stored
tensor read is checked against the sha256 the index recorded for it (file layout: checkpoint/format.py)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..sharding import ShardSpec
from .format import INDEX, CheckpointError, dtype_of, tensor_digest

__all__ = ["Reader"]

_RESTORE = "restore the file or save the checkpoint again"


class Reader:
    """Reads any box of any saved tensor from the files that hold it.

    With checksums (index version 2) a stored tensor is read whole once, verified, and the box cut from it
    (a rank touches only the files holding its rows, so it reads at most those pieces). Without (version 1)
    reads are lazy safetensors slices, unverified.
    """

    def __init__(self, directory: Path, index: dict):
        self.directory, self.index = Path(directory), index
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}
        self._verified: dict[tuple[str, str], torch.Tensor] = {}  # the current tensor's verified pieces

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def check_files(self) -> None:
        """Fail before anything is loaded if a file the index names is gone or has the wrong size: every
        rank checks every file (a stat each), so all ranks fail alike instead of some loading and some not."""
        sizes = self.index.get("file_bytes") or [None] * len(self.index["files"])
        for rel, expected in zip(self.index["files"], sizes, strict=True):
            path = self.directory / rel
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {self.directory} is incomplete: {path} (named by {INDEX}) is missing; "
                    "restore it or save the checkpoint again"
                )
            size = path.stat().st_size
            if expected is not None and size != expected:
                raise CheckpointError(
                    f"{path} is damaged: it is {size} bytes, {INDEX} recorded {expected} "
                    f"({'truncated' if size < expected else 'grown or replaced'}); {_RESTORE}"
                )

    def _open(self, rel: str):
        if rel not in self._handles:
            path = self.directory / rel
            if not path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {self.directory} is incomplete: {path} (named by {INDEX}) is missing; "
                    "restore it or save the checkpoint again"
                )
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                metadata, keys = handle.metadata() or {}, set(handle.keys())
            except Exception as exc:  # safetensors' own errors do not say which file
                raise CheckpointError(
                    f"{path} is damaged: safetensors cannot read it ({type(exc).__name__}: {exc}); a truncated "
                    f"file or a corrupt header. {_RESTORE}"
                ) from exc
            saved_by = metadata.get("save_id")
            if saved_by != self.index["save_id"]:
                raise CheckpointError(
                    f"{path} was written by save {saved_by!r}, but {INDEX} is from save {self.index['save_id']!r}: "
                    "the directory mixes two checkpoints; save it again"
                )
            self._handles[rel] = handle
            self._keys[rel] = keys
        return self._handles[rel]

    def _stored(self, rel: str, name: str, digest: str) -> torch.Tensor:
        """The whole tensor `name` as stored in `rel`, verified against `digest`."""
        key = (rel, name)
        if key not in self._verified:
            if any(n != name for _, n in self._verified):  # keep only the pieces of the tensor being read
                self._verified.clear()
            path = self.directory / rel
            try:
                tensor = self._open(rel).get_tensor(name)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc}); {_RESTORE}") from exc
            got = tensor_digest(tensor)
            if got != digest:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is corrupt: its bytes hash to sha256 {got[:16]}..., {INDEX} recorded "
                    f"{digest[:16]}...; {_RESTORE}"
                )
            self._verified[key] = tensor
        return self._verified[key]

    def _slice(self, rel: str, name: str, box: list[tuple[int, int]], digest: str | None) -> torch.Tensor:
        handle = self._open(rel)
        if name not in self._keys[rel]:
            raise CheckpointError(f"{self.directory / rel} does not hold {name!r} although {INDEX} says it does")
        if digest is not None:
            whole = self._stored(rel, name, digest)
            part = whole[tuple(slice(lo, hi) for lo, hi in box)]
            return part.clone() if part.numel() < whole.numel() else part  # do not pin the whole piece
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
            return self._slice(whole[0]["file"], name, box, whole[0].get("sha256"))
        dim = entry["dim"]
        segments = []  # (start, stop, piece, offset of start in that file's tensor)
        for piece in entry["pieces"]:
            offset = 0
            for start, stop in piece["ranges"]:
                segments.append((start, stop, piece, offset))
                offset += stop - start
        lo, hi = box[dim]
        parts, cur = [], lo
        while cur < hi:
            covering = [seg for seg in segments if seg[0] <= cur < seg[1]]
            if not covering:
                raise CheckpointError(
                    f"checkpoint {self.directory} is incomplete: no file holds {name}[{cur}] along dim {dim}; "
                    "save the checkpoint again"
                )
            start, stop, piece, offset = max(covering, key=lambda seg: seg[1])  # fewest reads
            stop = min(stop, hi)
            local = list(box)
            local[dim] = (offset + cur - start, offset + stop - start)
            parts.append(self._slice(piece["file"], name, local, piece.get("sha256")))
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
