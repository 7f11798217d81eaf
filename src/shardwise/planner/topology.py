"""Which link class each process group crosses, from the placement of tp and dp ranks on nodes.

Ranks come from the mesh's own formula (shardwise.mesh.global_rank), so the planner places groups exactly as
init_mesh(placement=...) builds them: "tp-inner" keeps a tp group on consecutive ranks (inside a node when tp
divides the devices per node), "dp-inner" a dp group. node = rank // devices_per_node (torchrun numbers a node's
ranks contiguously).
"""

from __future__ import annotations

from collections import Counter

from ..mesh import PLACEMENTS, global_rank
from .hardware import GroupSpan


def groups(tp: int, dp: int, placement: str, kind: str) -> list[list[int]]:
    """Every group of `kind` ('tp' or 'dp') as its global ranks in group-rank (= ring) order."""
    if kind == "tp":
        return [[global_rank(t, d, tp, dp, placement) for t in range(tp)] for d in range(dp)]
    return [[global_rank(t, d, tp, dp, placement) for d in range(dp)] for t in range(tp)]


def span(tp: int, dp: int, placement: str, kind: str, devices_per_node: int) -> GroupSpan:
    """The link class of `kind`'s groups (all alike) and the most ring hops leaving one node at once over all
    of them (they run the same collective together, so those hops share that node's link)."""
    members = groups(tp, dp, placement, kind)
    size = len(members[0])
    if size == 1:
        return GroupSpan(1, "none", 0)
    uploads: Counter = Counter()
    klasses = set()
    for ranks in members:
        nodes = [r // devices_per_node for r in ranks]
        distinct = len(set(nodes))
        klasses.add("intra" if distinct == 1 else "inter" if distinct == size else "mixed")
        for i, node in enumerate(nodes):
            if nodes[(i + 1) % size] != node:
                uploads[node] += 1
    klass = "mixed" if "mixed" in klasses or len(klasses) > 1 else klasses.pop()
    nodes = [r // devices_per_node for r in members[0]]
    per_node = max(nodes.count(x) for x in set(nodes)) if klass != "intra" else size
    return GroupSpan(size, klass, max(uploads.values(), default=0), per_node, groups=len(members))


__all__ = ["PLACEMENTS", "groups", "span"]
