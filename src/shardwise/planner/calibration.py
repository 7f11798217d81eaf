"""Measure this machine for the cost model (`shardwise calibrate`): calibration v2, and its readers.

`calibrate_here()` runs inside every rank of a torchrun / shardwise.launch job, all ranks busy at once as in
training, and measures: all-reduce, all-gather and reduce-scatter per link class ("intra": groups inside a
node; "inter": one rank per node, and the whole world when it spans nodes) and group size, fitted as
T = alpha + beta * bytes (full tensor bytes) by least squares on relative error; F.linear forward and backward
times over a grid of shapes (`gemm_time` interpolates it); element-wise memory bandwidth; the fixed cost of a
tiny op and of a tiny autograd node. `load_calibration(path)` reads the JSON (v1 files converted).

The v1 helpers (`timed`, `median_time`, `collective`, `matmul_flops`, `calibrate_rank`) stay for bench code.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise

from . import calibration_kernels as kernels
from . import calibration_measure as measure
from .calibration_groups import check_plan, layout_from_env, plans
from .hardware import tail_beta_ratio

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


# ---- calibration v2 ----------------------------------------------------------------------------------------

VERSION = 2
GRID_AXIS = (64, 256, 1024, 4096)
GRID_MAX_MKN = 2**31  # larger shapes take seconds each on a CPU rank: their rate is carried over (gemm_time)
QUICK_AXIS = (64, 256)
QUICK_SIZES = [4096, 65536, 2**20]
SKEW_SHAPES = {False: [(128, 256, 1024), (512, 1024, 1024)], True: [(64, 256, 256), (256, 256, 1024)]}


def default_gemm_shapes(quick: bool = False) -> list[tuple[int, int, int]]:
    """(m tokens, k in, n out) grid: every combination of the axis values up to GRID_MAX_MKN multiply-adds."""
    axis = QUICK_AXIS if quick else GRID_AXIS
    return [(m, k, n) for m in axis for k in axis for n in axis if m * k * n <= GRID_MAX_MKN]


def _message_sizes(quick: bool, max_bytes: int, sizes: list[int] | None) -> list[int]:
    chosen = sizes or (QUICK_SIZES if quick else SIZES)
    chosen = sorted({s for s in chosen if s <= max_bytes}) or [min(chosen)]
    if len(chosen) < 2:
        raise ValueError(f"max_bytes={max_bytes} leaves {len(chosen)} message size: the alpha-beta fit needs 2 "
                         "or more (raise --max-mib)")  # fmt: skip
    return chosen


def _reps(nbytes: int, quick: bool) -> int:
    """Calls per message size: enough small ones for the mean to see the tail (measure.summarize)."""
    if quick:
        return 12 if nbytes < 2**18 else 3
    return 48 if nbytes < 2**20 else 5 if nbytes < 2**24 else 3


def _join_world() -> None:
    """A gloo process group over torchrun's / shardwise.launch's env:// variables, unless one exists."""
    if dist.is_initialized():
        return
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"{name} is not set: calibrate_here() runs inside ranks started by torchrun or "
                               "shardwise.launch; from a shell use `shardwise calibrate --ranks N`")  # fmt: skip
    timeout = float(os.environ.get("SHARDWISE_TIMEOUT_S", "300"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    # the group this joined is ours to tear down: a torchrun worker exiting with gloo's groups alive can abort in
    # their threads at interpreter exit ("terminate called without an active exception", SIGABRT: it failed a lab
    # job), as init_mesh's own atexit handler says
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def _check_nodes(layout) -> None:
    """Under torchrun GROUP_RANK names each rank's node: it must match the contiguous layout assumed."""
    if "GROUP_RANK" not in os.environ or os.environ.get("SHARDWISE_CAL_PROCS_PER_NODE"):
        return
    nodes = [None] * layout.world
    dist.all_gather_object(nodes, int(os.environ["GROUP_RANK"]))
    expected = [layout.node_of(r) for r in range(layout.world)]
    if nodes != expected:
        raise ValueError(f"ranks are not contiguous per node (GROUP_RANK per rank: {nodes}, expected {expected}): "
                         "calibrate_here assumes torchrun's rank order, or pass procs_per_node")  # fmt: skip


def calibrate_here(mesh=None, quick: bool = False, max_bytes: int = 64 * 2**20, gemm_shapes=None,
                   procs_per_node: int | None = None, sizes: list[int] | None = None) -> dict | None:  # fmt: skip
    """Calibration v2 of this job's ranks; collective over the world (every rank calls it). Returns the
    JSON-able dict on rank 0, None elsewhere.

    mesh: an existing shardwise mesh (its process group is reused; the groups measured are built here over
    the whole world), or None (joins the world from RANK/WORLD_SIZE/MASTER_* if not joined yet).
    procs_per_node: ranks per node (default: $SHARDWISE_CAL_PROCS_PER_NODE, $LOCAL_WORLD_SIZE); nodes hold
    contiguous ranks. quick: 3 message sizes up to 1 MiB, 3 calls each, a 2x2x2 GEMM grid (tests, CI).
    max_bytes: largest full-tensor message. gemm_shapes: [(m, k, n), ...] instead of the default grid.

    What "under load" is (measured here, GPT block h=1024 tp=2, its four 2 MiB all-reduces, CLOCK_MONOTONIC
    timestamps of both ranks): from the last rank's arrival to the first one's exit the block's all-reduce
    takes 3.4-5.3 ms, as a hot-buffer barrier-per-call measurement (v1: 3.3-4.9 ms) roughly says; the
    profiler's comm per call is 6-17 ms because each rank also waits for the other to finish its compute
    (median arrival skew 3.5-34 ms, growing with the machine's load). So v1's gap (13.9 ms predicted vs
    31.4 ms measured per step) is mostly that wait, not a slower link. Measured here without a barrier, after
    an element-wise producer, the transfer comes out 0-1.5x higher than v1 (unsynchronised arrival), and
    `rank_skew` measures the wait: a GEMM segment then a 4-byte all-reduce, no barrier; wait_per_compute_s
    (about 0.06 here) times the compute between two collectives predicted the block's 4.1 ms wait per call."""
    _join_world()
    began = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = layout_from_env(world, procs_per_node)
    _check_nodes(layout)
    msg_sizes = _message_sizes(quick, max_bytes, sizes)
    collectives: dict = {}
    contend = measure.oversubscribed()
    for plan in plans(layout):
        check_plan(plan, layout)
        mine = None
        for grp in plan.groups:  # new_group is collective: every rank creates every group, in the same order
            group = dist.new_group(list(grp))
            if rank in grp:
                mine = group
        g = plan.group_size
        rounded = sorted({max(4 * g, nbytes // (4 * g) * 4 * g) for nbytes in msg_sizes})
        for op in measure.OPS:
            calls = measure.sweep(op, rounded, [_reps(b, quick) for b in rounded], g, mine)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, calls)
            if rank == 0:
                s = measure.summarize(per_rank, plan.groups, rounded)
                # the transfer alone (last rank's arrival to first exit): for a model adding rank_skew's wait itself
                transfer = fit([(n, max(t, 1e-7)) for n, t in s["after_last_arrival"]])
                entry = fit(s["points"]) | s
                entry = entry | {
                    "residuals": size_residuals(entry),
                    "tail_beta_ratio": tail_beta_ratio(entry),
                    "transfer_fit": {k: transfer[k] for k in ("alpha_s", "beta_s_per_byte")},
                    "concurrent_groups": len(plan.groups), "ranks_per_node": plan.ranks_per_node,
                    "groups": [list(grp) for grp in plan.groups],
                }  # fmt: skip
                collectives.setdefault(plan.link_class, {}).setdefault(op, {})[str(g)] = entry
            if contend and len(plan.groups) > 1:
                measure.add_contended(op, rounded, quick, g, mine, plan, collectives)
    t_comm = time.perf_counter()
    shapes = [tuple(s) for s in (gemm_shapes or default_gemm_shapes(quick))]
    gemm = [None] * world
    dist.all_gather_object(gemm, measure.gemm_grid(shapes, quick))
    mem = [None] * world
    dist.all_gather_object(mem, measure.memory_ops(quick))
    over = [None] * world
    dist.all_gather_object(over, measure.op_overheads(quick))
    kern = [None] * world
    dist.barrier()
    dist.all_gather_object(kern, kernels.measure_all(quick))  # attention core, element-wise kinds, per-op costs
    penalty = [None] * world
    dist.all_gather_object(penalty, measure.post_collective_penalty(quick))
    skews = []
    for shape in SKEW_SHAPES[quick]:  # a short and a long compute segment: is the wait a constant or a share?
        skews.append([None] * world)
        dist.all_gather_object(skews[-1], measure.rank_skew(quick, shape))
    if rank != 0:
        return None
    points, spread = [], []
    for i, (m, k, n) in enumerate(shapes):
        fwd = [r[i][0] for r in gemm]
        bwd = [r[i][1] for r in gemm]
        points.append({"m": m, "k": k, "n": n, "fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd),
                       "fwd_max_s": max(fwd), "bwd_max_s": max(bwd)})  # fmt: skip
        spread.append((max(fwd) + max(bwd)) / (statistics.median(fwd) + statistics.median(bwd)))
    mem_ops = {op: statistics.median(r[op] for r in mem) for op in mem[0]}
    skew_points = []
    for skew in skews:
        segment = statistics.median(c for r in skew for c, _, _ in r)
        wait = statistics.median(statistics.mean(r[i][1] - r[i][2] for r in skew) for i in range(len(skew[0])))
        skew_points.append([segment, max(wait, 0.0)])
    return {
        "version": VERSION, "host": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backend": dist.get_backend(), "threads_per_rank": torch.get_num_threads(), "world": world,
        "nodes": layout.nodes, "procs_per_node": layout.procs_per_node,
        "link_rate": os.environ.get("SHARDWISE_LAB_RATE"), "quick": quick,
        "method": "all ranks at once; collectives: input produced by an element-wise op just before, fresh "
                  "output, no barrier per call, per call the max over the group's ranks, median over calls",
        "collectives": collectives,
        "gemm": {"concurrent_ranks": world, "points": points, "rank_imbalance": statistics.median(spread)},
        "memory_bandwidth_Bps": statistics.median(mem_ops.values()), "memory_ops_Bps": mem_ops,
        "op_overhead_s": statistics.median(o[0] for o in over),
        "autograd_node_s": statistics.median(o[1] for o in over),
        "rank_skew": _skew_line(skew_points),
        "post_collective_s": statistics.median(penalty),
        **kernels.merge(kern),
        "elapsed_s": {"collectives": t_comm - began, "total": time.perf_counter() - began},
    }  # fmt: skip


def size_residuals(entry: dict) -> list[list[float]]:
    """[[bytes, measured - (alpha + beta * bytes) seconds]] per measured size of a collective's entry: what the
    fitted line misses at each size (hardware.fit_time adds it back, interpolated)."""
    return [[n, t - (entry["alpha_s"] + entry["beta_s_per_byte"] * n)] for n, t in entry["points"]]


def _skew_line(points: list[list[float]]) -> dict:
    """wait = wait_const_s + wait_per_compute_s * compute, through the (short, long) segment points, >= 0."""
    (c0, w0), (c1, w1) = points
    slope = max((w1 - w0) / (c1 - c0), 0.0) if c1 > c0 else 0.0
    return {"points": points, "wait_const_s": max(w0 - slope * c0, 0.0), "wait_per_compute_s": slope}


def gemm_time(cal: dict, m: float, k: float, n: float, phase: str = "fwd") -> float:
    """Seconds of F.linear's `phase` ("fwd": 2mkn FLOPs; "bwd": input grad + weight grad, 4mkn) at [m, k] x
    [k, n], from cal["gemm"]["points"]: the FLOP rate interpolated linearly in log m, log k, log n between the
    grid's axis values (clamped at the ends), so grid points come back exactly and time is monotone between
    neighbours that are. Grid points never measured (too large) take the best rate of the measured shapes
    they dominate (bigger GEMMs are no less efficient)."""
    if phase not in ("fwd", "bwd"):
        raise ValueError(f"phase must be 'fwd' or 'bwd', got {phase!r}")
    factor = 2.0 if phase == "fwd" else 4.0
    points = cal["gemm"]["points"]
    rates = {(p["m"], p["k"], p["n"]): factor * p["m"] * p["k"] * p["n"] / p[f"{phase}_s"] for p in points}
    axes = [sorted({key[i] for key in rates}) for i in range(3)]

    def rate_at(key) -> float:
        if key in rates:
            return rates[key]
        below = [r for (a, b, c), r in rates.items() if a <= key[0] and b <= key[1] and c <= key[2]]
        return max(below) if below else min(rates.values())

    brackets = [kernels.log_bracket(axis, v) for axis, v in zip(axes, (m, k, n), strict=True)]
    log_rate = 0.0
    for corner in range(8):
        weight, key = 1.0, []
        for i, (lo, hi, t) in enumerate(brackets):
            up = corner >> i & 1
            weight *= t if up else 1 - t
            key.append(hi if up else lo)
        if weight:
            log_rate += weight * math.log(rate_at(tuple(key)))
    return factor * m * k * n / math.exp(log_rate)


def _from_v1(cal: dict) -> dict:
    """A v1 file (one tp group, one matmul rate) as v2: its fits are the intra class at group size tp; its
    matmul rate one GEMM point (MLP's first shape); memory bandwidth and op overhead unknown (None)."""
    tp = int(cal["tp"])
    ops = {op: dict(f) | {"points": cal.get("points", {}).get(op, []), "concurrent_groups": 1, "ranks_per_node": tp}
           for op, f in cal["fits"].items()}  # fmt: skip
    shape = cal.get("matmul_shape", {"hidden": 1024, "tokens": 512})
    m, k, n = shape["tokens"], shape["hidden"], 4 * shape["hidden"] // tp
    flops = float(cal["matmul_flops"])
    return {
        "version": VERSION, "converted_from": 1, "host": cal.get("host"), "date": cal.get("date"),
        "backend": cal.get("backend", "gloo"), "threads_per_rank": cal.get("threads_per_rank", 1), "world": tp,
        "nodes": 1, "procs_per_node": cal.get("devices_per_node", tp), "link_rate": None,
        "collectives": {"intra": {op: {str(tp): f} for op, f in ops.items()}},
        "gemm": {"concurrent_ranks": tp, "points": [{"m": m, "k": k, "n": n, "fwd_s": 2 * m * k * n / flops,
                                                      "bwd_s": 4 * m * k * n / flops}]},  # fmt: skip
        "memory_bandwidth_Bps": None, "op_overhead_s": None, "matmul_flops": flops,
    }  # fmt: skip


def _refuse(path, why: str):
    return ValueError(f"{path}: {why}; write one with `shardwise calibrate --out {path}`")


def load_calibration(path) -> dict:
    """The calibration at `path` as a v2 dict (a v1 file converted by _from_v1), validated: ValueError naming
    `shardwise calibrate` for anything else (FileNotFoundError likewise)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no calibration at {path}: write one with `shardwise calibrate --out {path}`")
    try:
        cal = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"not JSON ({exc})") from None
    if not isinstance(cal, dict):
        raise _refuse(path, "not a shardwise calibration")
    if "version" not in cal and {"tp", "fits", "matmul_flops"} <= set(cal):
        try:
            cal = _from_v1(cal)
        except (KeyError, TypeError, ValueError) as exc:
            raise _refuse(path, f"a v1 calibration that cannot be read ({exc!r})") from None
    if cal.get("version") != VERSION:
        raise _refuse(path, f"not a shardwise calibration v{VERSION} (version={cal.get('version')!r})")
    try:
        for link, ops in cal["collectives"].items():
            for op, by_size in ops.items():
                for g, f in by_size.items():
                    if not (int(g) >= 2 and f["alpha_s"] >= 0 and f["beta_s_per_byte"] > 0):
                        raise ValueError(f"{link}/{op}/{g}: bad fit {f}")
        if not cal["gemm"]["points"] or any(q["fwd_s"] <= 0 or q["bwd_s"] <= 0 for q in cal["gemm"]["points"]):
            raise ValueError("gemm has no points or non-positive times")
        for key in ("world", "nodes", "procs_per_node", "memory_bandwidth_Bps", "op_overhead_s"):
            cal[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(path, f"incomplete or invalid calibration ({exc!r})") from None
    return cal
