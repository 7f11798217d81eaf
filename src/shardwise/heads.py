"""Which attention heads each tp rank holds.

q heads are dealt out whole, as evenly as possible (9 heads on tp=2: 5 and 4). Each rank holds the
kv heads its q heads read (q head i reads kv head i // (num_heads / num_kv_heads)); a kv head read by
q heads on two ranks is held by both, and its grads are summed over them (see comm.sum_grad_over_replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

from .sharding import balanced_range


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
