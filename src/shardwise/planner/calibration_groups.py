"""Which ranks sit on which node, and the groups a calibration measures per link class.

A "plan" is one link class at one group size: a list of disjoint groups covering the whole world, all
measured at the same time, because in training every rank is busy at once (four tp groups of 2 on a node
share its cores; one-rank-per-node groups share the node's network link).

    intra  groups inside one node: size g | procs_per_node, every node's groups at once
    inter  groups with one rank per node: size g | nodes, all procs_per_node x nodes/g such groups at once;
           plus, when nodes > 1 and procs_per_node > 1, the whole world ("mixed": ranks_per_node =
           procs_per_node), stored under inter with its group size (the world size)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """The world as nodes: global ranks of one node are contiguous (torchrun's rule), node = rank // per_node."""

    world: int
    procs_per_node: int

    @property
    def nodes(self) -> int:
        return self.world // self.procs_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.procs_per_node


@dataclass(frozen=True)
class Plan:
    """One measurement: `groups` (global ranks) all run `link_class` collectives of one size at once."""

    link_class: str  # intra | inter
    group_size: int
    ranks_per_node: int  # ranks of one group on one node: g for intra, 1 for inter, procs_per_node for mixed
    groups: tuple[tuple[int, ...], ...]


def layout_from_env(world: int, procs_per_node: int | None = None) -> Layout:
    """procs_per_node: the argument, else $SHARDWISE_CAL_PROCS_PER_NODE (a fake node split for tests: 4 local
    ranks as 2 nodes of 2), else $LOCAL_WORLD_SIZE (torchrun and shardwise.launch set it), else the world."""
    if procs_per_node is None:
        value = os.environ.get("SHARDWISE_CAL_PROCS_PER_NODE") or os.environ.get("LOCAL_WORLD_SIZE")
        procs_per_node = int(value) if value else world
    if procs_per_node < 1 or world % procs_per_node:
        raise ValueError(
            f"procs_per_node={procs_per_node} does not divide the world of {world} ranks: every node must hold "
            "the same number of ranks (set --procs-per-node to a divisor of the world)"
        )
    return Layout(world, procs_per_node)


def _sizes(n: int) -> list[int]:
    return [g for g in range(2, n + 1) if n % g == 0]


def plans(layout: Layout) -> list[Plan]:
    """Every plan to measure, in an order all ranks agree on (group creation is collective)."""
    p, n = layout.procs_per_node, layout.nodes
    out = []
    for g in _sizes(p):  # consecutive ranks inside each node
        groups = tuple(tuple(node * p + j * g + i for i in range(g)) for node in range(n) for j in range(p // g))
        out.append(Plan("intra", g, g, groups))
    for g in _sizes(n):  # one rank per node: local index l of g consecutive nodes
        groups = tuple(tuple((j * g + i) * p + local for i in range(g)) for local in range(p) for j in range(n // g))
        out.append(Plan("inter", g, 1, groups))
    if n > 1 and p > 1:  # the whole world across nodes (e.g. tp=4 over 2 nodes x 2)
        out.append(Plan("inter", layout.world, p, (tuple(range(layout.world)),)))
    return out


def check_plan(plan: Plan, layout: Layout) -> None:
    """Groups partition the world and each has the node structure its class claims (raise otherwise)."""
    seen = sorted(r for grp in plan.groups for r in grp)
    if seen != list(range(layout.world)):
        raise AssertionError(f"{plan.link_class} groups of {plan.group_size} do not partition the world: {plan.groups}")
    for grp in plan.groups:
        per_node: dict[int, int] = {}
        for r in grp:
            per_node[layout.node_of(r)] = per_node.get(layout.node_of(r), 0) + 1
        if set(per_node.values()) != {plan.ranks_per_node}:
            raise AssertionError(f"{plan.link_class} group {grp}: ranks per node {per_node}, "
                                 f"expected {plan.ranks_per_node} on each")  # fmt: skip
