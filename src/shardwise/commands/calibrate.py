"""`shardwise calibrate`: measure this machine (or this torchrun job's nodes), write calibration v2 JSON.

Locally it launches --ranks gloo processes (one box = one node unless --procs-per-node splits it); started by
torchrun (WORLD_SIZE set, e.g. inside `shardwise lab run`) it measures the job's own ranks in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import shardwise

from ..planner.calibration import calibrate_here


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def report(cal: dict) -> str:
    lines = [f"shardwise calibrate: {cal['world']} gloo ranks = {cal['nodes']} node(s) x {cal['procs_per_node']} on "
             f"{cal['host']}, link rate {cal['link_rate'] or 'not shaped by the lab'}"]  # fmt: skip
    lines.append(f"{'class':<6} {'op':<15} {'group':>5} {'x groups':>8} {'alpha (us)':>11} {'GB/s':>7} "
                 f"{'fit err med':>11} {'contended':>9}")  # fmt: skip
    for link, ops in cal["collectives"].items():
        for op, by_size in ops.items():
            for g, f in by_size.items():
                contended = f"x{f['contended']['ratio']:.2f}" if f.get("contended") else "-"
                lines.append(f"{link:<6} {op:<15} {g:>5} {f['concurrent_groups']:>8} {f['alpha_s'] * 1e6:>11.1f} "
                             f"{1e-9 / f['beta_s_per_byte']:>7.2f} {f['median_rel_error']:>11.1%} "
                             f"{contended:>9}")  # fmt: skip
    rates = [2 * p["m"] * p["k"] * p["n"] / p["fwd_s"] / 1e9 for p in cal["gemm"]["points"]]
    lines.append(f"GEMM forward: {min(rates):.1f}..{max(rates):.1f} GFLOP/s per rank over {len(rates)} shapes "
                 f"({cal['gemm']['concurrent_ranks']} ranks at once; slowest rank / median "
                 f"{cal['gemm']['rank_imbalance']:.2f})")  # fmt: skip
    op_us, node_us = cal["op_overhead_s"] * 1e6, cal["autograd_node_s"] * 1e6
    lines.append(f"memory bandwidth (element-wise): {cal['memory_bandwidth_Bps'] / 1e9:.2f} GB/s per rank; "
                 f"op overhead {op_us:.2f} us, autograd node {node_us:.1f} us")  # fmt: skip
    skew = cal["rank_skew"]
    waits = ", ".join(f"{w * 1e3:.2f} ms wait after {c * 1e3:.1f} ms compute" for c, w in skew["points"])
    lines.append(f"rank skew: {waits} (wait = {skew['wait_const_s'] * 1e3:.2f} ms + "
                 f"{skew['wait_per_compute_s']:.3f} x compute)")  # fmt: skip
    if "post_collective_s" in cal:
        lines.append(f"after a blocking collective the next compute takes {cal['post_collective_s'] * 1e3:.2f} ms "
                     "longer (cold caches, a woken thread); contended: a group's collectives while the other groups "
                     "compute, relative to all groups at once (oversubscribed hosts only)")  # fmt: skip
    return "\n".join(lines)


def main(ranks: int, out: str, max_bytes: int = 64 * 2**20, quick: bool = False, procs_per_node: int | None = None,
         gemm_shapes=None) -> dict | None:  # fmt: skip
    """Run the calibration (launching `ranks` local ranks, or in place under torchrun), write `out` from rank 0
    and return the dict there (None on the other ranks)."""
    if _under_torchrun():
        cal = calibrate_here(None, quick, max_bytes, gemm_shapes, procs_per_node)
    else:
        if ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {ranks}")
        cal = shardwise.launch(calibrate_here, ranks, None, quick, max_bytes, gemm_shapes, procs_per_node,
                               timeout_s=3600)[0]  # fmt: skip
    if cal is None:
        return None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(cal, indent=1))
    print(report(cal))
    print(f"written: {out}  (use: shardwise plan --calibration {out})")
    return cal
