"""Measured CPU kernels for the cost model beyond GEMMs: the attention core, element-wise kinds, and the fixed
cost of one aten op / autograd node. Each rank runs these at once (as in training, oversubscribed cores included).

Why: on a CPU the attention core at small s and d runs far below GEMM rates, GELU / norms / rotary are
compute-bound (erf, rsqrt, sin/cos: ~7 ns per element for gelu backward, not bytes / bandwidth), and a layer
issues ~100 tiny aten ops (views, transposes) and ~30 autograd nodes per micro-batch that cost 1-10 us each.

Stored in the calibration as:
  "attention": {"points": [{"s", "d", "fwd": [alpha_s, s_per_unit], "bwd": [...], "linearity": t8 / (8 t1)}]}
      one unit = one (batch x head) sequence of causal F.scaled_dot_product_attention at [s, d];
  "kernels": {kind: {"fwd": [alpha_s, s_per_elem], "bwd": [alpha_s, s_per_elem], "points": [...]}} (and
      "accumulate": a cold .grad.add_, for gradient accumulation);
  "overhead": {"aten_op_s": ..., "autograd_node_s": ..., "accumulate_grad_s": ...}.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

ATTN_S = (64, 256, 512, 1024)
ATTN_D = (32, 64, 128)
QUICK_ATTN = ((64, 128), (32, 64))
QUICK_CHAIN_COUNTS = (139, 254, 58)  # chain_counts() on torch 2.13, CPU (a test checks it)
KERNEL_ROWS = {False: (64, 512, 4096), True: (16, 128)}  # rows of 256 (x4 for the ffn-wide kinds) elements


def _rotary(x: torch.Tensor) -> torch.Tensor:
    from ..nn.attention import rotary  # the exact ops the layers issue

    return rotary(x, torch.arange(x.shape[0]), 10000.0)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], torch.ones(x.shape[-1]))


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], torch.ones(x.shape[-1]), torch.zeros(x.shape[-1]))


# kind -> (fn of the input(s), inputs per call, feature width): the ops nn/ and layers/ issue for that kind
KINDS = {
    "gelu": (F.gelu, 1, 1024),
    "silu_mul": (lambda a, b: F.silu(a) * b, 2, 1024),
    "layer_norm": (_ln, 1, 256),
    "rms_norm": (_rms, 1, 256),
    "add": (torch.add, 2, 256),
    "mul": (torch.mul, 2, 256),
    "dropout": (lambda a: F.dropout(a, 0.1), 1, 256),
    "rotary": (_rotary, 1, 256),  # x: [s, 1, heads, 32]
    "log_softmax": (lambda a: torch.log_softmax(a, -1), 1, 512),
}


def _fwd_bwd(fn, inputs: list[torch.Tensor], quick: bool, base: bool = True) -> tuple[float, float]:
    """Forward and backward seconds per call of fn(*inputs) (fresh grads each time): calls repeated over a
    window (30 ms; quick 3 ms) and averaged, the median of 3 windows. Averaging over a window, not the median
    call: with more ranks than cores each call is short enough to run inside one scheduler slice at full speed,
    and only the window shows the core shared with the other ranks (all busy at once). The backward is less
    that of a view of the same shape (base): .backward()'s own start-up, the ones_like seed and the leaf's
    AccumulateGrad are paid once per step in training, not per op."""
    view = [torch.zeros_like(inputs[0], requires_grad=True)]
    b0 = _fwd_bwd(lambda t: t.view(t.shape), view, quick, False)[1] if base else 0.0
    window = 0.003 if quick else 0.03
    fwd, bwd = [], []
    for w in range(2 if quick else 4):  # the first window is warm-up
        f = b = 0.0
        calls = 0
        while f + b < window or not calls:
            for t in inputs:
                t.grad = None
            t0 = time.perf_counter()
            y = fn(*inputs)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            b += time.perf_counter() - t1
            f += t1 - t0
            calls += 1
        if w:
            fwd.append(f / calls)
            bwd.append(b / calls)
    return statistics.median(fwd), max(statistics.median(bwd) - b0, 0.0)


def fit_per_element(points: list[tuple[float, float]]) -> list[float]:
    """[alpha_s, s_per_elem] of T = alpha + beta * n by least squares on relative error, both >= 0."""
    points = [(n, max(t, 1e-9)) for n, t in points]  # a backward at the view baseline's time: ~0
    rows = [(1 / t, n / t) for n, t in points]
    s11, s12, s22 = (sum(a * a for a, _ in rows), sum(a * b for a, b in rows), sum(b * b for _, b in rows))
    r1, r2 = sum(a for a, _ in rows), sum(b for _, b in rows)
    det = s11 * s22 - s12 * s12
    if abs(det) < 1e-30:
        n, t = max(points)
        return [0.0, t / n]
    alpha, beta = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    if alpha < 0:  # no fixed part visible: through the origin
        return [0.0, sum(t * n for n, t in points) / sum(n * n for n, _ in points)]
    return [alpha, max(beta, 0.0)]


def kernel_rates(quick: bool) -> dict:
    """kind -> {"fwd": [alpha, beta], "bwd": [alpha, beta], "points": [[elements, fwd_s, bwd_s], ...]}."""
    out = {}
    for kind, (fn, n_in, width) in KINDS.items():
        pts = []
        for rows in KERNEL_ROWS[quick]:
            shape = (rows, 1, 8, 32) if kind == "rotary" else (rows, width)
            inputs = [torch.randn(shape, requires_grad=True) for _ in range(n_in)]
            f, b = _fwd_bwd(fn, inputs, quick)
            pts.append([math.prod(shape), f, b])
        out[kind] = {"fwd": fit_per_element([(n, f) for n, f, _ in pts]),
                     "bwd": fit_per_element([(n, b) for n, _, b in pts]), "points": pts}  # fmt: skip
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def accumulate_rate(quick: bool) -> dict:
    """Gradient accumulation: .grad.add_(new grad) per parameter tensor, cold (the step's parameters, grads
    and optimizer state are far bigger than the caches): buffers rotated over a 64 MiB (quick: 8 MiB) set."""
    pts = []
    for numel in (256 * 256, 256 * 1024) if not quick else (4096, 65536):
        count = max(2, (8 if quick else 64) * 2**20 // (8 * numel))
        pairs = [(torch.randn(numel), torch.randn(numel)) for _ in range(count)]
        times = []
        for i in range(3 * count if not quick else count):
            a, b = pairs[i % count]
            t0 = time.perf_counter()
            a.add_(b)
            times.append(time.perf_counter() - t0)
        pts.append([numel, statistics.median(times[count // 2 :]), 0.0])
    rate = fit_per_element([(n, t) for n, t, _ in pts])
    return {"fwd": rate, "bwd": rate, "points": pts}


def attention_grid(quick: bool) -> list[dict]:
    """Causal SDPA fwd and bwd per (s, d), at 1 and 8 units (2 beyond s = 256: big), fitted alpha + per-unit."""
    s_axis, d_axis = QUICK_ATTN if quick else (ATTN_S, ATTN_D)
    out = []
    for s in s_axis:
        for d in d_axis:
            big = 8 if s <= 256 else 2
            times = {}
            for units in (1, big):
                # [s, b, heads, d] permuted to [b, heads, s, d], strided as nn/attention.py hands them over
                qkv = [torch.randn(s, 1, units, d, requires_grad=True) for _ in range(3)]
                times[units] = _fwd_bwd(_sdpa, qkv, quick)
            row = {"s": s, "d": d, "units": [1, big]}
            for i, phase in enumerate(("fwd", "bwd")):
                t1, tb = times[1][i], times[big][i]
                per_unit = max((tb - t1) / (big - 1), tb / big * 0.5)
                row[phase] = [max(t1 - per_unit, 0.0), per_unit]
                row[f"{phase}_linearity"] = tb / (big * max(t1, 1e-9))
            out.append(row)
    return out


def tiny_chain(links: int = 8):
    """(fwd, weights, x0): fwd(weights) runs `links` x (view, transpose, reshape, F.linear) on [4, 8] and sums;
    the chain overheads() times (tiny tensors: dispatch, not arithmetic)."""
    ws = [torch.randn(8, 8, requires_grad=True) for _ in range(links)]
    x0 = torch.randn(4, 8, requires_grad=True)

    def fwd(weights):
        x = x0
        for w in weights:
            x = F.linear(x.view(2, 2, 8).transpose(0, 1).reshape(4, 8), w)
        return x.sum()

    return fwd, ws, x0


def chain_counts() -> tuple[int, int, int]:
    """(aten ops in forward, aten ops in backward, autograd nodes in backward) of tiny_chain(), by torch.profiler
    (nested events included, as workload.py's per-block counts)."""
    from torch.profiler import profile

    fwd, ws, _ = tiny_chain()

    with profile() as p:  # one session (its start-up is most of quick mode's time), phases by a marker op
        y = fwd(ws)
        marker = torch.ones(1).neg_()  # the one aten::neg_ of the chain: events after it are the backward
        y.backward()
    ev = sorted(p.events(), key=lambda e: e.time_range.start)
    cut = next(i for i, e in enumerate(ev) if e.name == "aten::neg_") + 1
    del marker
    fwd_ops = sum(1 for e in ev[:cut] if e.name.startswith("aten::")) - 4  # the marker: ones, empty, fill_, neg_
    bwd_ops = sum(1 for e in ev[cut:] if e.name.startswith("aten::"))
    nodes = sum(1 for e in ev[cut:] if e.name.startswith("autograd::engine::evaluate_function: "))
    return fwd_ops, bwd_ops, nodes


def overheads(quick: bool) -> dict:
    """Seconds per aten op (forward), per autograd node and per AccumulateGrad (backward), on a chain of tiny
    Linear + view + transpose ops as a layer issues them; the op counts come from torch.profiler."""
    fwd, ws, x0 = tiny_chain()
    if quick:  # torch.profiler's start-up (1-2 s a rank) is most of quick mode: counted once on torch 2.13 CPU
        fwd_ops, bwd_ops, nodes = QUICK_CHAIN_COUNTS
    else:
        fwd_ops, bwd_ops, nodes = chain_counts()
    reps = 20 if quick else 200

    def timed(weights):
        fwd_s, bwd_s = [], []
        for _ in range(reps):
            x0.grad = None
            for w in ws:
                w.grad = None
            t0 = time.perf_counter()
            y = fwd(weights)
            t1 = time.perf_counter()
            y.backward()
            fwd_s.append(t1 - t0)
            bwd_s.append(time.perf_counter() - t1)
        return _window_mean(fwd_s), _window_mean(bwd_s)

    timed(ws)
    f, b = timed(ws)
    op_s = f / fwd_ops
    node_s = max(b - bwd_ops * op_s, 0.0) / nodes
    return {"aten_op_s": op_s, "autograd_node_s": node_s, "accumulate_grad_s": _accumulate_grad_s(reps),
            "counts": {"fwd_ops": fwd_ops, "bwd_ops": bwd_ops, "bwd_nodes": nodes}}  # fmt: skip


def _window_mean(samples: list[float]) -> float:
    """The median over 4 consecutive windows of the mean call time in each (see _fwd_bwd: means over a window
    see the core shared with oversubscribed ranks, single calls do not)."""
    q = max(1, len(samples) // 4)
    return statistics.median(statistics.fmean(samples[i : i + q]) for i in range(0, q * 4, q))


def _accumulate_grad_s(reps: int, leaves: int = 16) -> float:
    """One AccumulateGrad into a fresh .grad: the backward of a sum of `leaves` small leaf tensors, all of them
    requiring grad, minus the same sum where only the first does (the same Add nodes run in both)."""
    ps = [torch.randn(8, requires_grad=True) for _ in range(leaves)]
    frozen = ps[:1] + [p.detach() for p in ps[1:]]

    def backward_s(tensors) -> float:
        samples = []
        for _ in range(reps):
            for p in ps:
                p.grad = None
            y = tensors[0]
            for t in tensors[1:]:
                y = y + t
            t0 = time.perf_counter()
            y.sum().backward()
            samples.append(time.perf_counter() - t0)
        return _window_mean(samples)

    backward_s(ps)
    return max(backward_s(ps) - backward_s(frozen), 0.0) / (leaves - 1)


def measure_all(quick: bool) -> dict:
    """This rank's attention grid, kernel rates and overheads (all ranks call it at once)."""
    attention = {"points": attention_grid(quick)}
    kinds = kernel_rates(quick) | {"accumulate": accumulate_rate(quick)}
    return {"attention": attention, "kernels": kinds, "overhead": overheads(quick)}


def merge(per_rank: list[dict]) -> dict:
    """Median over ranks of every number (same structure as one rank's measure_all)."""

    def med(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: med([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [med([v[i] for v in values]) for i in range(len(first))]
        if isinstance(first, float):
            return statistics.median(values)
        return first

    return med(per_rank)


def log_bracket(axis: list[float], v: float) -> tuple[float, float, float]:
    """(lo, hi, weight of hi) of `v` between neighbours of the sorted `axis`, the weight linear in log v; clamped
    at the ends (weight 0 on the end value), so a value on the axis comes back exactly. The one bracketing rule
    of every measured grid (GEMM, attention core)."""
    if v <= axis[0]:
        return axis[0], axis[0], 0.0
    if v >= axis[-1]:
        return axis[-1], axis[-1], 0.0
    hi = next(i for i, a in enumerate(axis) if a >= v)
    if axis[hi] == v:
        return v, v, 0.0
    lo = axis[hi - 1]
    return lo, axis[hi], math.log(v / lo) / math.log(axis[hi] / lo)


def attention_time(cal: dict, s: float, d: float, units: float, phase: str = "fwd") -> float:
    """Seconds of causal SDPA `phase` over `units` (batch x heads) sequences of [s, d]: alpha and the per-unit
    time interpolated bilinearly in (log s, log d) on log values between the grid's axis values (grid points
    come back exactly); beyond the grid in s the per-unit time scales as s^2 (the causal FLOPs), in d as d."""
    pts = {(p["s"], p["d"]): p[phase] for p in cal["attention"]["points"]}
    s_axis, d_axis = sorted({k[0] for k in pts}), sorted({k[1] for k in pts})

    (s0, s1, ws), (d0, d1, wd) = log_bracket(s_axis, s), log_bracket(d_axis, d)
    alpha = beta = 0.0
    for sv, w_s in ((s0, 1 - ws), (s1, ws)):
        for dv, w_d in ((d0, 1 - wd), (d1, wd)):
            w = w_s * w_d
            if w:
                a, b = pts[(sv, dv)]
                alpha += w * math.log(max(a, 1e-9))
                beta += w * math.log(max(b, 1e-12))
    scale = (max(s, s_axis[-1]) / s_axis[-1]) ** 2 * max(d, d_axis[-1]) / d_axis[-1]
    scale *= (min(s, s_axis[0]) / s_axis[0]) ** 2 * min(d, d_axis[0]) / d_axis[0]
    return math.exp(alpha) + math.exp(beta) * scale * units


def kernel_time(cal_kernels: dict, kind: str, elements: float, phase: str) -> float:
    """Seconds of one `kind` op over `elements` elements in `phase` from the measured [alpha, per-element]."""
    alpha, beta = cal_kernels[kind][phase]
    return alpha + beta * elements if elements > 0 else 0.0


__all__ = ["KINDS", "QUICK_CHAIN_COUNTS", "accumulate_rate", "attention_grid", "attention_time", "chain_counts",
           "fit_per_element", "kernel_rates", "kernel_time", "log_bracket", "measure_all", "merge", "overheads",
           "tiny_chain"]  # fmt: skip
