"""The measurements behind calibration v2, each run by every rank at once (as in training).

Collectives are timed the way a training step issues them: the input is produced by compute just before
(a fresh tensor from an element-wise op, as a layer's matmul output is), the output is allocated fresh per
call, and there is NO barrier before each call; a call's time is the max over its group's ranks (a
collective ends for the step when its slowest rank leaves). A barrier before every call (v1) hides the
arrival skew between ranks and keeps the buffer hot; see calibrate_here's docstring for what that changes.
Every timestamp is time.perf_counter() (CLOCK_MONOTONIC: one clock for every process of one machine), so
rank 0 can also tell the part after the last rank arrived and check that groups ran at the same time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

OPS = ("all_reduce", "all_gather", "reduce_scatter")
COLD_BYTES = 16 * 2**20  # gemm_grid's operand copies per shape


def _issue(op: str, src: torch.Tensor, g: int, group) -> None:
    """One collective on a full tensor of src.numel() * g (all_gather) or src.numel() (the others) elements."""
    if op == "all_reduce":
        dist.all_reduce(src, group=group)
    elif op == "all_gather":
        dist.all_gather_single(torch.empty(src.numel() * g), src, group=group)
    else:
        dist.reduce_scatter_single(torch.empty(src.numel() // g), src, group=group)


def compute_for(seconds: float, x: torch.Tensor, w: torch.Tensor) -> None:
    """Busy this rank's core with GEMMs for `seconds` (the same time on every rank, so ranks arrive together)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        F.linear(x, w)


def sweep(op: str, sizes: list[int], reps: list[int], g: int, group,
          barrier: bool = True) -> list[list[tuple[float, float]]]:  # fmt: skip
    """This rank's (start, end) of every timed call, per size. sizes: full-tensor bytes (fp32, rounded to a
    multiple of 4*g by the caller). All ranks of the world call this at once, each with its own group.

    The sizes are interleaved round-robin (rep 1 of every size, then rep 2, ...), not one size's calls back to
    back: gloo's slow calls come in bursts (a scheduler hiccup stalls several calls in a row), and one size's
    calls in a row caught 0 or 5 of them (means 0.44 vs 2.26 ms for 8 vs 16 bytes); interleaved, every size
    sees the same share. A compute gap (a 1 ms GEMM loop) before each call was tried as "how a step issues
    them": in the fabric lab it matched 2 ranks (64 KiB all-reduce, slowest rank's mean: unshaped 2.08 ms vs
    the step's 1.5-1.9; 100mbit 4.7 vs 4.4, where back to back says 5.6: a token bucket refills during compute)
    but with 4 ranks on 2 cores it inflated every collective 35-60% over the steps' (busy-looping ranks starve
    gloo's threads), and the lab's step predictions were worse overall (19 of 40 within 15% vs 24): none."""
    tensors = []
    for nbytes in sizes:
        numel = nbytes // 4
        tensors.append(torch.randn(numel // g if op == "all_gather" else numel))
    if barrier:  # all ranks of the world start together (False: only some groups sweep, see contended_sweep)
        dist.barrier()
    for base in tensors:  # warm-up: connections, allocator
        _issue(op, base.mul(1.0), g, group)
    if barrier:  # again: a group's first calls (connection setup) can take 10+ ms longer than another's
        dist.barrier()
    out: list[list[tuple[float, float]]] = [[] for _ in sizes]
    for rep in range(max(reps)):
        for i, base in enumerate(tensors):
            if rep >= reps[i]:
                continue
            src = base.mul(1.0)  # produced by compute just before, a fresh tensor, as in a layer
            start = time.perf_counter()
            _issue(op, src, g, group)
            out[i].append((start, time.perf_counter()))
    return out


CONTENDED_MAX_BYTES = 2**18  # the latency-bound sizes a step's TP collectives mostly are, here


def oversubscribed() -> bool:
    """Whether some host runs more ranks than it has cores (collective over the world). A host is a boot id, so
    the lab's namespaces count as the one machine they share."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = platform.node()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (boot, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    hosts = {b for b, _ in every}
    return any(sum(b == h for b, _ in every) > max(c for b, c in every if b == h) for h in hosts)


def contended_sweep(op: str, sizes: list[int], reps: list[int], g: int, group, index: int,
                    busy_s: float) -> list[list[tuple[float, float]]]:  # fmt: skip
    """sweep() with half of the concurrent groups computing meanwhile: groups of even `index` sweep while the odd
    ones run GEMMs for `busy_s`, then the other way round; every rank returns its own sweep. In a step the tp
    groups drift apart, so one group's collective meets the other groups' compute on shared cores; measured in
    the lab (2 nodes x 2 ranks on 2 cores) the tp=2 steps' collectives cost 2-2.5x what all groups
    communicating at once (sweep) shows, while tp=4 (one group) matched it."""
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    out: list = []
    for turn in (0, 1):
        dist.barrier()
        if index % 2 == turn:
            out = sweep(op, sizes, reps, g, group, barrier=False)
        else:
            compute_for(busy_s, x, w)
    dist.barrier()
    return out


def add_contended(op: str, rounded: list[int], quick: bool, g: int, group, plan, collectives: dict) -> None:
    """On an oversubscribed host, `op`'s small sizes again with half the groups computing (contended_sweep):
    entry["contended"] = {"points", "ratio": median over sizes of contended / all-groups-at-once}. The model
    multiplies a collective by it when its group has concurrent siblings (GroupSpan.groups > 1)."""
    rank = dist.get_rank()
    small = [n for n in rounded if n <= CONTENDED_MAX_BYTES] or rounded[:1]
    reps = [12 if quick else 24 for _ in small]
    entry = collectives[plan.link_class][op][str(g)] if rank == 0 else None
    # the computing half must outlast the sweeping half: 3x the all-at-once time of the same calls, + 50 ms
    busy = [3 * sum(r * t for (n, t), r in zip([p for p in entry["points"] if p[0] in small], reps, strict=True))
            + 0.05 if rank == 0 else None]  # fmt: skip
    dist.broadcast_object_list(busy, src=0)
    index = next(i for i, grp in enumerate(plan.groups) if rank in grp)
    calls = contended_sweep(op, small, reps, g, group, index, busy[0])
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, calls)
    if rank == 0:
        points = summarize(per_rank, plan.groups, small)["points"]
        alone = dict((n, t) for n, t in entry["points"])
        ratio = statistics.median(t / alone[n] for n, t in points)
        entry["contended"] = {"points": points, "ratio": max(ratio, 1.0)}


def summarize(per_rank: list, groups, sizes: list[int]) -> dict:
    """From every rank's sweep: per size, the MEAN over calls of the max over the group's ranks (then the
    median over the concurrent groups); the part after the last arrival (mean too); each group's window.

    Why the mean: a step pays the SUM of its collectives, and a blocking gloo call's time has a long tail.
    Measured here (2 ranks, 2 cores, 256 B all-reduce after 1 ms of compute, 200 calls): median 0.42 ms,
    mean 1.24 ms, max 6.7 ms; inside a real GPT step the same: median 0.39-0.45 ms, mean 1.3-1.7 ms
    (bench/collective_timeline.py). A median-based alpha predicted a third of tp's communication."""
    points, after_last, windows = [], [], []
    for grp in groups:
        calls = [per_rank[r] for r in grp]
        windows.append([min(c[0][0][0] for c in calls), max(c[-1][-1][1] for c in calls)])
    for i, nbytes in enumerate(sizes):
        per_group, tail = [], []
        for grp in groups:
            rows = list(zip(*(per_rank[r][i] for r in grp), strict=True))  # per call: one (start, end) per rank
            per_group.append(statistics.mean(max(e - s for s, e in row) for row in rows))
            tail.append(statistics.mean(min(e for _, e in row) - max(s for s, _ in row) for row in rows))
        points.append([nbytes, statistics.median(per_group)])
        after_last.append([nbytes, max(statistics.median(tail), 0.0)])
    return {"points": points, "after_last_arrival": after_last, "windows": windows}


def _grid_reps(flops: float, quick: bool) -> int:
    if quick:
        return 2
    return max(1, min(5, int(0.2 / (flops / 5e9))))  # ~0.2 s per point at 5 GFLOP/s; big shapes: 1 call


def gemm_grid(shapes: list[tuple[int, int, int]], quick: bool) -> list[tuple[float, float]]:
    """This rank's (fwd_s, bwd_s) of F.linear(x[m, k], w[n, k]) and its backward (input grad and weight grad,
    fresh .grad each time as after zero_grad(set_to_none=True)), per shape: the median over windows of the
    mean call in each (30 ms, quick 3 ms, or one call when longer). All ranks start each shape together
    (barrier) and compute concurrently, so oversubscribed cores are in the numbers: a single short call runs
    inside one scheduler slice at full speed, a window's mean shares the core with the other ranks."""
    out = []
    for m, k, n in shapes:
        # cold operands, as in a step (a layer's weight was last touched a whole step ago; saved activations
        # a whole forward ago): copies rotated over COLD_BYTES, well beyond a core's L2 (hot: 20-45% faster
        # at m=64 on this CPU)
        copies = max(1, min(64, COLD_BYTES // (4 * (m * k + n * k + m * n))))
        operands = [(torch.randn(m, k, requires_grad=True), torch.randn(n, k, requires_grad=True), torch.randn(m, n))
                    for _ in range(copies)]  # fmt: skip
        reps = _grid_reps(6.0 * m * k * n, quick)
        window = 0.003 if quick else 0.03
        dist.barrier()
        fwd, bwd = [], []
        for i in range(reps + 1):
            f = b = 0.0
            calls = 0
            while not calls or f + b < window:  # a window's mean: see calibration_kernels._fwd_bwd
                x, w, gy = operands[calls % copies]
                x.grad = w.grad = None
                t0 = time.perf_counter()
                y = F.linear(x, w)
                t1 = time.perf_counter()
                y.backward(gy)
                b += time.perf_counter() - t1
                f += t1 - t0
                calls += 1
            if i:  # the first window is warm-up
                fwd.append(f / calls)
                bwd.append(b / calls)
        out.append((statistics.median(fwd), statistics.median(bwd)))
    return out


def memory_ops(quick: bool, numel: int = 2**20) -> dict[str, float]:
    """Bytes moved per second by element-wise work on 4 MiB fp32 tensors (fresh outputs, read + write bytes),
    this rank, all ranks at once."""
    a, b = torch.randn(numel), torch.randn(numel)
    rows = a.view(-1, 1024)
    ops = {
        "add": (lambda: a + b, 12),
        "mul": (lambda: a * 2.0, 8),
        "gelu": (lambda: F.gelu(a), 8),
        "layer_norm": (lambda: F.layer_norm(rows, (1024,)), 8),
        "softmax": (lambda: torch.softmax(rows, dim=-1), 8),
    }
    reps = 3 if quick else 15
    dist.barrier()
    out = {}
    for name, (fn, bytes_per_elem) in ops.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = bytes_per_elem * numel / statistics.median(times)
    return out


def op_overheads(quick: bool) -> tuple[float, float]:
    """(seconds per tiny torch op, seconds per tiny autograd node forward + backward), this rank, all at once."""
    tiny = torch.ones(1)
    n = 200 if quick else 2000
    dist.barrier()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(tiny, tiny)
        samples.append((time.perf_counter() - t0) / n)
    op_s = min(samples)  # the fixed cost: the least-disturbed block
    chain = 8
    x = torch.ones(1, requires_grad=True)
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n // chain):
            y = x
            for _ in range(chain):
                y = y * 1.0
            y.backward()
        samples.append((time.perf_counter() - t0) / (n // chain * chain))
    return op_s, min(samples)


def post_collective_penalty(quick: bool) -> float:
    """Extra seconds a compute segment takes right after a blocking collective over the world, compared with the
    same segment right after another segment (alternating, so drift cancels), this rank, all ranks at once.
    Measured here: a 2.1 ms GEMM + GELU segment takes 2.4-2.5 ms after a 64 KiB all-reduce (loopback and the
    lab's veth alike): caches cold and the thread woken, maybe on the other core. A step pays it per collective,
    as compute: the model adds it there (Hardware.post_collective_s)."""
    xs = [torch.randn(64, 256) for _ in range(4)]
    ws = [torch.randn(1024, 256) for _ in range(4)]
    flag = torch.ones(16384)

    def segment() -> float:
        t0 = time.perf_counter()
        for x, w in zip(xs, ws, strict=True):
            F.gelu(F.linear(x, w))
        return time.perf_counter() - t0

    after_coll, after_compute = [], []
    dist.barrier()
    for i in range((40 if quick else 200) + 4):
        dist.all_reduce(flag.mul(1.0))
        a = segment()
        b = segment()
        if i >= 4:
            after_coll.append(a)
            after_compute.append(b)
    return max(statistics.mean(after_coll) - statistics.mean(after_compute), 0.0)


def rank_skew(quick: bool, shape: tuple[int, int, int]) -> list[tuple[float, float, float]]:
    """This rank's (compute_s, wait_s, back_to_back_s) per rep: a GEMM segment of `shape` (m, k, n), as a
    layer's compute between two collectives, then a 4-byte all-reduce over the world with no barrier, whose
    time is mostly waiting for the slowest rank to finish its segment; back_to_back_s is the same all-reduce
    right after another (ranks already in step): the part that is not waiting."""
    m, k, n = shape
    x, w = torch.randn(m, k), torch.randn(n, k)
    flag = torch.ones(1)
    out = []
    dist.barrier()
    for i in range((3 if quick else 10) + 1):
        t0 = time.perf_counter()
        F.linear(x, w)
        t1 = time.perf_counter()
        dist.all_reduce(flag)
        t2 = time.perf_counter()
        dist.all_reduce(flag)
        t3 = time.perf_counter()
        if i:
            out.append((t1 - t0, t2 - t1, t3 - t2))
    return out
