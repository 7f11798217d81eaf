"""Measure this machine's fabric and matmul speed for the cost model (`shardwise calibrate`).

On the tp group: all-reduce, all-gather and reduce-scatter of full tensors from 4 B to 64 MiB, median
of several repetitions (max over ranks, after a barrier), fitted as T = alpha + beta * bytes by least
squares on relative error (small messages would otherwise not count). And the matmul FLOP/s of the
layer shapes. Results go to a JSON file the planner reads (`shardwise plan --calibration FILE`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import shardwise

SIZES = [4 * 4**i for i in range(13)]  # 4 B ... 64 MiB


def timed(fn, reps: int, group=None) -> list[float]:
    """Seconds of each of `reps` calls of `fn` across ranks: a barrier first so all start together, then
    the max over `group`'s ranks (a collective or a parallel step ends when its slowest rank does).
    Collective: every rank of `group` (default: the world) calls it with the same reps."""
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return times


def median_time(fn, reps: int, group=None) -> float:
    """The median of `timed(fn, reps, group)` (the upper one for even reps): robust to a stray slow call."""
    return sorted(timed(fn, reps, group))[reps // 2]


def collective(op: str, nbytes: int, mesh) -> tuple:
    """(a zero-argument call issuing `op` over mesh's tp group on ~nbytes of fp32, the full tensor's numel).
    `op`: all_reduce | all_gather | reduce_scatter; the numel is rounded to a multiple of tp for the last two."""
    numel = max(1, nbytes // 4)
    m = mesh.tp_size
    if op == "all_reduce":
        buf = torch.ones(numel)
        return lambda: dist.all_reduce(buf, group=mesh.tp_group), numel
    if op == "all_gather":
        numel = max(m, numel // m * m)
        local, out = torch.ones(numel // m), torch.empty(numel)
        return lambda: dist.all_gather_single(out, local, group=mesh.tp_group), numel
    numel = max(m, numel // m * m)
    full, out = torch.ones(numel), torch.empty(numel // m)
    return lambda: dist.reduce_scatter_single(out, full, group=mesh.tp_group), numel


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares of T = alpha + beta * n on relative error: minimise sum ((a + b n - t) / t)^2."""
    rows = [(1 / t, n / t) for n, t in points]
    s11 = sum(a * a for a, _ in rows)
    s12 = sum(a * b for a, b in rows)
    s22 = sum(b * b for _, b in rows)
    r1 = sum(a for a, _ in rows)
    r2 = sum(b for _, b in rows)
    det = s11 * s22 - s12 * s12
    alpha = (r1 * s22 - r2 * s12) / det
    beta = (s11 * r2 - s12 * r1) / det
    alpha, beta = max(alpha, 0.0), max(beta, 1e-15)
    errors = [abs(alpha + beta * n - t) / t for n, t in points]
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_GBps": 1e-9 / beta,
            "median_rel_error": sorted(errors)[len(errors) // 2], "max_rel_error": max(errors)}  # fmt: skip


def matmul_flops(hidden: int, tokens: int, tp: int, reps: int = 5) -> float:
    """FLOP/s of the MLP's local matmuls [tokens, h] x [h, 4h/tp] and back, forward and backward."""
    x = torch.randn(tokens, hidden, requires_grad=True)
    w1 = torch.randn(4 * hidden // tp, hidden, requires_grad=True)
    w2 = torch.randn(hidden, 4 * hidden // tp, requires_grad=True)

    def step():
        torch.nn.functional.linear(torch.nn.functional.linear(x, w1), w2).sum().backward()

    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    flops = 3 * 2 * 2 * tokens * hidden * 4 * hidden / tp
    return flops / sorted(times)[len(times) // 2]


def calibrate_rank(tp: int, max_bytes: int, hidden: int, tokens: int) -> dict | None:
    mesh = shardwise.init_mesh(tp)
    results: dict = {"tp": tp, "points": {}, "fits": {}}
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        points = []
        for nbytes in [s for s in SIZES if s <= max_bytes]:
            run, numel = collective(op, nbytes, mesh)
            run()  # warm-up: connection set-up, allocation
            reps = 25 if numel * 4 < 2**20 else 7
            points.append((numel * 4, median_time(run, reps)))
        results["points"][op] = points
        results["fits"][op] = fit(points)
    results["matmul_flops"] = matmul_flops(hidden, tokens, tp)
    results["matmul_shape"] = {"hidden": hidden, "tokens": tokens}
    return results if mesh.tp_rank == 0 else None
