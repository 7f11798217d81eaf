"""How a parameter is sharded: the metadata each sharded parameter carries, and gathering it back.

Parameters that know their own layout (nanotron's idea) let checkpoints reshard and tests compare
against the dense model without knowing which layer made them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .mesh import Mesh


@dataclass(frozen=True)
class ShardSpec:
    """This rank's tensor is the concatenation, along `dim`, of the ranges [start, stop) of a tensor
    whose full size there is `full`. One range for a plain split; several for a fused projection
    (q, k and v blocks of one weight). `replicated`: other ranks may hold some of the same rows
    (kv heads shared by ranks), so gathering must not add them up. `valid`: only the first `valid`
    entries along `dim` are real, the rest is padding that depends on tp (a padded vocabulary)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int
    replicated: bool = False
    valid: int | None = None

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def to_json(self) -> dict:
        return {"dim": self.dim, "ranges": [list(r) for r in self.ranges], "full": self.full,
                "replicated": self.replicated, "valid": self.valid}  # fmt: skip

    @staticmethod
    def from_json(data: dict) -> ShardSpec:
        ranges = tuple(tuple(r) for r in data["ranges"])
        return ShardSpec(data["dim"], ranges, data["full"], data["replicated"], data.get("valid"))


def balanced_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` is split into `parts` sizes differing by at most one
    (the first total % parts parts get the extra one)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split_range(total: int, mesh: Mesh, what: str) -> tuple[int, int]:
    """This rank's [start, stop) of `total` features: equal shares, or shares differing by one where
    tp does not divide `total`. Every rank needs at least one."""
    if total < mesh.tp_size:
        raise ValueError(
            f"{what}={total} cannot be split over tp={mesh.tp_size} ranks (each needs at least one); use tp <= {total}"
        )
    return balanced_range(total, mesh.tp_size, mesh.tp_rank)


@dataclass(frozen=True)
class ShardInfo:
    """Everything a sharded parameter says about itself, in one record.

    spec: this rank's rows (None: the parameter is whole on every rank).
    layout: how the full tensor is cut at ANY tp, as a JSON-able hint (built by heads.layout_hint),
        so an offline reshard can derive other tp degrees; None where the spec's balanced split says it.
    transposed: the dense model stores this tensor transposed ([in, out], transformers' Conv1D), so
        checkpoints and comparisons transpose it back."""

    spec: ShardSpec | None = None
    layout: dict | None = None
    transposed: bool = False


_ATTR = "_shardwise_info"  # the one attribute a parameter carries; read and written only here
_KEEP = object()


def shard_info(param: torch.Tensor) -> ShardInfo:
    """The parameter's ShardInfo (an empty one, spec None, for a parameter nobody sharded)."""
    return getattr(param, _ATTR, None) or ShardInfo()


def set_shard_info(param: torch.Tensor, spec=_KEEP, *, layout=_KEEP, transposed=_KEEP) -> torch.Tensor:
    """Set the fields given, keeping the others; returns `param`."""
    info = shard_info(param)
    changes = {k: v for k, v in (("spec", spec), ("layout", layout), ("transposed", transposed)) if v is not _KEEP}
    setattr(param, _ATTR, replace(info, **changes))
    return param


def copy_shard_info(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Give `dst` (a new Parameter replacing `src`) the same record; returns `dst`."""
    setattr(dst, _ATTR, shard_info(src))
    return dst


def shard_spec(param: torch.Tensor) -> ShardSpec | None:
    return shard_info(param).spec


def take(full: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """This rank's shard of a full tensor, as `spec` describes it."""
    if spec is None:
        return full
    pieces = [full.narrow(spec.dim, start, stop - start) for start, stop in spec.ranges]
    return torch.cat(pieces, dim=spec.dim) if len(pieces) > 1 else pieces[0]


def place(full: torch.Tensor, shard: torch.Tensor, spec: ShardSpec) -> None:
    """Write a shard back into its places in `full` (in place)."""
    offset = 0
    for start, stop in spec.ranges:
        full.narrow(spec.dim, start, stop - start).copy_(shard.narrow(spec.dim, offset, stop - start))
        offset += stop - start


def gather_full(tensor: torch.Tensor, spec: ShardSpec | None, mesh: Mesh) -> torch.Tensor:
    """Reassemble the full tensor from every tp rank's shard (a plain collective, no autograd).
    Every rank of the tp group must call it. Unsharded tensors come back as they are."""
    if spec is None or mesh.tp_size == 1:
        return tensor.detach().clone()
    local = tensor.detach().movedim(spec.dim, 0).contiguous()
    specs = [None] * mesh.tp_size
    dist.all_gather_object(specs, spec.ranges, group=mesh.tp_group)
    longest = max(sum(b - a for a, b in ranges) for ranges in specs)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    stacked = padded.new_empty((mesh.tp_size * longest, *padded.shape[1:]))
    dist.all_gather_single(stacked, padded, group=mesh.tp_group)
    stacked = stacked.view(mesh.tp_size, *padded.shape)
    full = local.new_zeros((spec.full, *local.shape[1:]))
    for rank, ranges in enumerate(specs):
        place(full, stacked[rank], ShardSpec(0, ranges, spec.full))
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


def dense_layout(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A gathered full tensor in the dense model's own layout: vocabulary padding dropped, and
    transposed back where the dense module stored it [in, out] (transformers' Conv1D)."""
    info = shard_info(param)
    if info.spec is not None and info.spec.valid is not None:
        full = full.narrow(info.spec.dim, 0, info.spec.valid)
    return full.t() if info.transposed else full
