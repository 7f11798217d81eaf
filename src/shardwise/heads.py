"""Which attention heads each tp rank holds.

q heads are dealt out whole, as evenly as possible (9 heads on tp=2: 5 and 4). Each rank holds the
kv heads its q heads read (q head i reads kv head i // (num_heads / num_kv_heads)); a kv head read by
q heads on two ranks is held by both, and its grads are summed over them (see comm.sum_grad_over_replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

from .sharding import ShardSpec, balanced_range


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    q_start: int  # this rank's q heads: [q_start, q_stop)
    q_stop: int
    kv_start: int  # this rank's kv heads: [kv_start, kv_stop)
    kv_stop: int
    kv_shared: bool  # some kv head is held by two ranks (the same answer on every rank)

    @property
    def q_heads(self) -> int:
        return self.q_stop - self.q_start

    @property
    def kv_heads(self) -> int:
        return self.kv_stop - self.kv_start

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_index(self) -> list[int]:
        """For each local q head, the local index of the kv head it reads."""
        return [q // self.group - self.kv_start for q in range(self.q_start, self.q_stop)]

    @property
    def uniform_repeat(self) -> int | None:
        """r if local q head i reads local kv head i // r (what repeat_interleave / HF's repeat_kv do),
        else None (an uneven split cut a group: kv heads must be picked per q head)."""
        index = self.kv_index
        for repeat in range(1, self.q_heads + 1):
            if self.q_heads % repeat == 0 and self.q_heads // repeat == self.kv_heads:
                if index == [i // repeat for i in range(self.q_heads)]:
                    return repeat
        return None


def _kv_range(q_range: tuple[int, int], group: int) -> tuple[int, int]:
    return q_range[0] // group, (q_range[1] - 1) // group + 1


def head_layout(num_heads: int, num_kv_heads: int | None, tp: int, rank: int) -> HeadLayout:
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads} "
            "(each kv head serves the same number of q heads)"
        )
    if num_heads < tp:
        raise ValueError(
            f"num_heads={num_heads} cannot be split over tp={tp} ranks: every rank needs at least one whole "
            f"head; use tp <= {num_heads}"
        )
    group = num_heads // num_kv_heads
    q_ranges = [balanced_range(num_heads, tp, r) for r in range(tp)]
    kv_ranges = [_kv_range(q, group) for q in q_ranges]
    # Whether grads of kv heads need summing must be the same answer on every rank: the sum is a
    # collective, so a rank whose own heads happen to be unshared still has to take part.
    shared = any(a[1] > b[0] for a, b in zip(kv_ranges, kv_ranges[1:], strict=False))
    return HeadLayout(num_heads, num_kv_heads, *q_ranges[rank], *kv_ranges[rank], shared)


@dataclass(frozen=True)
class HeadShards:
    """This rank's slices of an attention module's weights, as ShardSpecs of the full tensors.

    q: rows of q [num_heads*d, in]; kv: rows of k or v [num_kv_heads*d, in]; o: columns (dim 1) of
    o [out, num_heads*d]; qkv: rows of a fused [q | k | v] projection."""

    layout: HeadLayout
    q: ShardSpec
    kv: ShardSpec
    o: ShardSpec
    qkv: ShardSpec


def head_shards(num_heads: int, num_kv_heads: int | None, head_dim: int, tp: int, rank: int,
                expand_kv: bool = False) -> HeadShards:  # fmt: skip
    """Which rows of q/k/v/o (and of a fused qkv) rank `rank` of `tp` holds: the one place this is worked
    out (modules build their layers from it, offline reshard derives other tp degrees from it).

    expand_kv=True (Hugging Face attention, which repeats kv heads by one factor): where an uneven split
    cut a kv group, k/v give one kv head per local q head, so a repeat factor of 1 maps them; those rows
    are then held twice somewhere, so kv is `replicated`."""
    lay = head_layout(num_heads, num_kv_heads, tp, rank)
    nh, nkv, d = lay.num_heads, lay.num_kv_heads, head_dim
    q_rows = (lay.q_start * d, lay.q_stop * d)
    kv_rows = ((lay.kv_start * d, lay.kv_stop * d),)
    kv_replicated = lay.kv_shared
    if expand_kv:
        if lay.uniform_repeat is None:
            kv_rows = tuple(((lay.kv_start + k) * d, (lay.kv_start + k + 1) * d) for k in lay.kv_index)
        kv_replicated = kv_replicated or any(head_layout(nh, nkv, tp, r).uniform_repeat is None for r in range(tp))
    k0, v0 = nh * d, (nh + nkv) * d
    kv0 = lay.kv_start * d, lay.kv_stop * d  # a fused projection holds whole kv heads (no expand)
    fused = (q_rows, (k0 + kv0[0], k0 + kv0[1]), (v0 + kv0[0], v0 + kv0[1]))
    return HeadShards(
        layout=lay,
        q=ShardSpec(0, (q_rows,), nh * d),
        kv=ShardSpec(0, kv_rows, nkv * d, kv_replicated),
        o=ShardSpec(1, (q_rows,), nh * d),
        qkv=ShardSpec(0, fused, (nh + 2 * nkv) * d, lay.kv_shared),
    )


def layout_hint(kind: str, num_heads: int, num_kv_heads: int | None, head_dim: int, role: str | None = None,
                expand_kv: bool = False) -> dict:  # fmt: skip
    """The JSON-able record (ShardInfo.layout, the checkpoint index's "layout") from which
    `spec_from_hint` rebuilds a parameter's ShardSpec at any tp. kind 'heads' (role 'q' | 'kv' | 'o')
    or 'fused_qkv'."""
    hint = {"kind": kind, "num_heads": num_heads, "num_kv_heads": num_heads if num_kv_heads is None else num_kv_heads,
            "head_dim": head_dim}  # fmt: skip
    if kind == "heads":
        hint |= {"role": role, "expand_kv": expand_kv}
    return hint


def spec_from_hint(hint: dict, tp: int, rank: int) -> ShardSpec:
    """The ShardSpec a parameter with layout `hint` has on `rank` of `tp` (split along hint["dim"] if given,
    else the weight's: rows for q/kv/qkv, columns for o)."""
    kind = hint.get("kind")
    try:
        nh, nkv, d = int(hint["num_heads"]), int(hint["num_kv_heads"]), int(hint["head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"layout hint {hint} needs integer num_heads, num_kv_heads, head_dim") from exc
    if kind not in ("heads", "fused_qkv"):
        raise ValueError(f"unknown layout hint kind {kind!r} (expected 'heads' or 'fused_qkv')")
    role = hint.get("role") if kind == "heads" else "qkv"
    if role not in ("q", "kv", "o", "qkv"):
        raise ValueError(f"layout hint {hint} needs role 'q', 'kv' or 'o'")
    spec = getattr(head_shards(nh, nkv, d, tp, rank, bool(hint.get("expand_kv", False))), role)
    return ShardSpec(int(hint.get("dim", spec.dim)), spec.ranges, spec.full, spec.replicated)
