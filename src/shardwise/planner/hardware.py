"""What a device and its fabric can do, for the cost model: GEMM time by shape, element-wise bandwidth, per-op
overhead, and collective time on the link class a group of ranks actually crosses.

Collectives follow the ring algorithms NCCL and gloo use: for a group of m ranks and a full tensor of n bytes,
an all-reduce moves 2(m-1)/m * n bytes through each hop in 2(m-1) steps, an all-gather or reduce-scatter
(m-1)/m * n bytes in m-1 steps, so T = steps * latency + fraction * n / bandwidth of the slowest hop.

Link classes (see topology.py): "intra" (every rank of the group on one node), "inter" (one rank per node),
"mixed" (a ring with both kinds of hop: its slowest hops are the inter ones). Inter hops share the node's
link with every other concurrently running group crossing it (`flows`), so their bandwidth is the node link's
divided by the flows it carries (beyond the NICs a node has).

A calibrated collective measured in exactly the group's situation is its alpha-beta line plus what the line
missed at each measured size (fit_time: residuals), times the calibration's contended ratio when the group has
sibling groups computing on the same oversubscribed cores (GroupSpan.groups > 1).

GPU GEMMs use a tiles/waves model derived from the hardware: the output [m, n] is cut into tile_m x tile_n
tiles, the SMs run one tile each per wave, a wave costs one full tile's FLOPs at the per-SM peak (partial
tiles and a partial last wave are paid in full), never faster than moving the operands at memory bandwidth,
plus one kernel launch. A calibration instead interpolates the GEMM grid it measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

OPS = ("all_reduce", "all_gather", "reduce_scatter")


def ring_steps(op: str, m: int) -> tuple[int, float]:
    """(latency steps, fraction of the full tensor crossing each hop) of a ring collective over m ranks."""
    if m <= 1:
        return 0, 0.0
    if op == "all_reduce":
        return 2 * (m - 1), 2 * (m - 1) / m
    return m - 1, (m - 1) / m


@dataclass(frozen=True)
class Link:
    latency_s: float  # per ring step
    bandwidth: float  # bytes/s through one hop, one direction

    def time(self, op: str, nbytes: float, m: int) -> float:
        steps, fraction = ring_steps(op, m)
        return steps * self.latency_s + fraction * nbytes / self.bandwidth


@dataclass(frozen=True)
class GroupSpan:
    """Where the ranks of one process group sit: size m, link class ('none' for m == 1, 'intra', 'inter',
    'mixed'), and flows = the most ring hops leaving any one node at once, over all concurrent groups of
    that kind (each shares that node's link)."""

    size: int
    klass: str
    flows: int = 1
    per_node: int = 1  # ranks of one group on each node it touches (mixed rings: > 1)
    groups: int = field(default=1, compare=False)  # groups of this kind running side by side (tp: dp of them)


@dataclass(frozen=True)
class Hardware:
    """A device and its fabric. The first eight fields are v1's (positional order kept); the rest are v2's
    and optional: without them GEMMs run at `flops` (backward twice the forward) and element-wise work is free,
    as v1 assumed."""

    name: str
    flops: float  # dense matmul FLOP/s per device at the training dtype (GPU profiles: the spec-sheet peak)
    memory: float  # bytes per device
    devices_per_node: int
    intra: Link  # inside a node
    inter: Link  # between nodes, one flow at the node link's full rate
    note: str = ""
    links: dict = field(default_factory=dict, compare=False)  # v1: op -> Link (one-node calibration)
    memory_bandwidth: float | None = None  # element-wise bytes (read + written) per second per device
    op_overhead_s: float = 0.0  # fixed cost of one kernel launch / small torch op / autograd node
    sms: int = 0  # streaming multiprocessors: > 0 turns on the tiles/waves GEMM model
    tile: tuple[int, int] = (128, 128)  # output tile of one SM's GEMM work unit
    gemm: Callable | None = field(default=None, compare=False, repr=False)  # (m, k, n, phase) -> s (calibration)
    fits: dict = field(default_factory=dict, compare=False, repr=False)  # (class, op, m) -> alpha/beta fit
    can_overlap: bool = True  # collectives on their own engine/stream beside compute (NCCL); False: gloo on CPU
    comm_uses_compute_cores: bool = False  # a background all-reduce takes CPU time from compute (gloo on CPU)
    node_link_flows: int = 1  # concurrent inter-node flows at full rate per node (NICs per node)
    fused_optimizer: bool = False  # Adam as one fused kernel (GPU) vs torch's per-tensor loop (CPU)
    intra_name: str = "intra-node link"
    bwd_op_overhead_s: float | None = None  # one autograd node in backward (None: op_overhead_s)
    skew_per_compute: float = 0.0  # wait at a blocking collective per second of compute before it (rank skew)
    inter_name: str = "inter-node link"
    # measured CPU kernels (calibration_kernels.py); None/0: element-wise work by bytes at memory_bandwidth
    kernels: dict | None = field(default=None, compare=False, repr=False)  # kind -> {"fwd"|"bwd": [alpha, s/elem]}
    attention: Callable | None = field(default=None, compare=False, repr=False)  # (s, d, units, phase) -> s
    aten_op_s: float = 0.0  # one aten op's dispatch (views, transposes, small ops), forward or backward
    autograd_node_s: float = 0.0  # the engine's cost of one autograd node beyond the aten ops it runs
    accumulate_grad_s: float = 0.0  # one AccumulateGrad into a fresh .grad (per parameter tensor)
    post_collective_s: float = 0.0  # compute slowed right after a blocking collective (CPU: cold caches, woken thread)

    # ---- v1 API -------------------------------------------------------------------------------------
    def link(self, op: str, ranks_span_nodes: bool) -> Link:
        if ranks_span_nodes:
            return self.inter
        return self.links.get(op, self.intra)

    # ---- compute ------------------------------------------------------------------------------------
    def gemm_time(self, m: int, k: int, n: int, phase: str = "fwd", batch: int = 1) -> float:
        """Seconds for `batch` GEMMs [m, k] x [k, n]; phase 'bwd' = both backward GEMMs (dX and dW),
        'dw' = the weight-gradient GEMM alone."""
        if m <= 0 or k <= 0 or n <= 0 or batch <= 0:
            return 0.0
        if self.gemm is not None:
            if phase == "dw":  # a calibration times dX + dW together: same FLOPs each
                return 0.5 * batch * self.gemm(m, k, n, "bwd")
            return batch * self.gemm(m, k, n, phase)
        if self.sms:
            if phase == "bwd":  # dX = dY W: [m, n] x [n, k]; dW = dY^T X: [n, m] x [m, k]
                return self.gemm_time(m, n, k, "fwd", batch) + self.gemm_time(n, m, k, "fwd", batch)
            if phase == "dw":
                return self.gemm_time(n, m, k, "fwd", batch)
            return batch * (tiled_gemm_s(self, m, k, n) + self.op_overhead_s)
        passes = {"fwd": 1, "bwd": 2, "dw": 1}[phase]
        return passes * batch * 2 * m * k * n / self.flops

    def elementwise_time(self, nbytes: float, ops: float, phase: str = "fwd") -> float:
        """Memory-bound work: `nbytes` read + written, `ops` kernels (forward) / autograd nodes (backward)."""
        if self.memory_bandwidth is None:
            return 0.0  # v1 hardware: element-wise work was not modelled
        per_op = self.bwd_op_overhead_s if phase == "bwd" and self.bwd_op_overhead_s is not None else self.op_overhead_s
        return nbytes / self.memory_bandwidth + ops * per_op

    def kernel_time(self, kind: str, elements: float, phase: str = "fwd") -> float | None:
        """Seconds of one measured element-wise `kind` op over `elements` elements, None when not measured."""
        if not self.kernels or kind not in self.kernels or elements <= 0:
            return None
        alpha, beta = self.kernels[kind][phase]
        return alpha + beta * elements

    def glue_time(self, aten_ops: float, nodes: float = 0.0, tensors: float = 0.0) -> float:
        """The dispatch cost of ops no measured kernel covers (views, transposes, small ops), autograd nodes
        and AccumulateGrad per parameter tensor; 0 without measured kernels (GPU profiles: launches are in
        op_overhead_s, views launch nothing)."""
        if not self.kernels:
            return 0.0
        return aten_ops * self.aten_op_s + nodes * self.autograd_node_s + tensors * self.accumulate_grad_s

    # ---- communication --------------------------------------------------------------------------------
    def collective(self, op: str, nbytes: float, span: GroupSpan) -> float:
        """Seconds for one `op` of a full tensor of `nbytes` over the group `span` (all concurrent groups of
        its kind running the same op at once)."""
        m = span.size
        if m <= 1 or nbytes <= 0:
            return 0.0
        if span.klass == "intra":
            fit = self.fits.get(("intra", op, m))
            if fit is not None:
                return fit_time(fit, nbytes) * _contention(fit, span)
            return self._ring_link("intra", op, m).time(op, nbytes, m)
        fit = self.fits.get(("inter", op, m))
        same = fit is not None and (fit.get("concurrent_groups", 1), fit.get("ranks_per_node", 1)) == (
            span.flows,
            span.per_node,
        )
        if same:
            return fit_time(fit, nbytes) * _contention(fit, span)  # measured exactly this situation
        link = self._ring_link("inter", op, m)
        share = min(1.0, self.node_link_flows / max(span.flows, 1))
        steps, fraction = ring_steps(op, m)
        return steps * link.latency_s + fraction * nbytes / (link.bandwidth * share)

    def _ring_link(self, klass: str, op: str, m: int) -> Link:
        """The per-step latency and per-flow bandwidth of `klass` (inter: one flow at the node link's full
        rate), from the measured fit nearest in group size (same op preferred), else the profile's Link."""
        if klass == "intra" and op in self.links:
            return self.links[op]
        candidates = [(key, f) for key, f in self.fits.items() if key[0] == klass and f.get("ranks_per_node", 1) == 1]
        if klass == "intra":
            candidates = [(key, f) for key, f in self.fits.items() if key[0] == klass]
        if not candidates:
            if klass == "intra" and not self.fits:
                return self.intra
            other = "inter" if klass == "intra" else "intra"
            if klass == "intra" and any(key[0] == other for key in self.fits):
                return self._ring_link(other, op, m)  # one rank per node: no intra measurement exists
            return self.intra if klass == "intra" else self.inter
        (_, fop, fm), f = min(candidates, key=lambda kv: (kv[0][1] != op, abs(math.log(kv[0][2] / m))))
        link = link_from_fit(fop, f, fm)
        if klass == "inter":  # the fit's flows shared the node link: scale back up to one flow
            link = Link(link.latency_s, link.bandwidth * f.get("concurrent_groups", 1))
        return link


def _contention(fit: dict, span: GroupSpan) -> float:
    """The calibration's contended/alone ratio (oversubscribed hosts only) when the group has siblings whose compute
    meets its collectives on the same cores; 1 otherwise."""
    return (fit.get("contended") or {}).get("ratio", 1.0) if span.groups > 1 else 1.0


def fit_time(fit: dict, nbytes: float) -> float:
    """Seconds of one collective of `nbytes` from a calibration's fit: alpha + beta * n, plus what the line
    missed at the measured sizes (fit["residuals"]: [[bytes, measured - line seconds]] written by the calibration,
    interpolated in log bytes, held at the smallest size; past the largest, growing at the measured tail's
    slope: fit["tail_beta_ratio"] x beta), never below 0. The straight line alone misses what is not linear in n:
    a token bucket lets a message under its burst pass at the wire's speed after compute (the lab at
    100mbit: 64 KiB in 3.3 ms where the line through 4 MiB says 5.3), as protocol switches do on real fabrics
    (NCCL's LL / LL128 / Simple). A fit whose beta was scaled (a slower live link, adaptive/replanner.py) adds
    its extra bytes-time in full and keeps the residuals."""
    line = fit["alpha_s"] + fit["beta_s_per_byte"] * nbytes
    residuals = fit.get("residuals")
    if not residuals or nbytes <= 0:
        return line
    x = math.log(nbytes)
    pts = sorted((math.log(n), r) for n, r in residuals)
    if x <= pts[0][0]:
        return max(line + pts[0][1], 0.0)
    for (x0, r0), (x1, r1) in zip(pts, pts[1:], strict=False):
        if x <= x1:
            return max(line + r0 + (r1 - r0) * (x - x0) / (x1 - x0), 0.0)
    # past the largest size: the last residual, plus the tail's extra slope (fit["tail_beta_ratio"], relative to
    # beta so that a scaled beta scales it too)
    extra = (fit.get("tail_beta_ratio", 1.0) - 1.0) * fit["beta_s_per_byte"] * (nbytes - max(n for n, _ in residuals))
    return max(line + pts[-1][1] + extra, 0.0)


def tail_beta_ratio(fit: dict) -> float:
    """The marginal seconds per byte between the two largest measured sizes (fit["points"]) over the fitted beta,
    at least 1: how much faster than the line time grows past the largest size. The line is fitted on relative
    error over every size, so its slope leans on the latency-bound small sizes (the lab at 1gbit: 6.0 ns/B through
    8 B..4 MiB, 8.6 between 1 and 4 MiB and in a 7 MB probe). Never below the line: a flatter tail of 3-5 large
    calls is noise, and a ratio near 0 would make every larger message cost the same. 1.0 with < 2 sizes."""
    pts = sorted(fit.get("points") or [])
    if len(pts) < 2 or pts[-1][0] <= pts[-2][0] or fit["beta_s_per_byte"] <= 0:
        return 1.0
    (n0, t0), (n1, t1) = pts[-2], pts[-1]
    return max((t1 - t0) / (n1 - n0) / fit["beta_s_per_byte"], 1.0)


def tiled_gemm_s(hw: Hardware, m: int, k: int, n: int) -> float:
    """Tiles/waves time of one GEMM [m, k] x [k, n] on a GPU (no launch): waves of `sms` output tiles, each
    tile the full tile_m * tile_n * k multiply-adds at the per-SM peak; floored by moving A, B and C once at
    memory bandwidth (2-byte operands, the training dtype of the GPU profiles)."""
    tm, tn = hw.tile
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    waves = math.ceil(tiles / hw.sms)
    compute = waves * 2 * tm * tn * k / (hw.flops / hw.sms)
    traffic = 2 * (m * k + k * n + m * n) / hw.memory_bandwidth if hw.memory_bandwidth else 0.0
    return max(compute, traffic)


def tile_efficiency(hw: Hardware, m: int, n: int) -> float:
    """Useful tiles / (waves * SMs), counting partial edge tiles by their useful fraction."""
    tm, tn = hw.tile
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    return (m * n / (tm * tn)) / (math.ceil(tiles / hw.sms) * hw.sms)


def link_from_fit(op: str, fit: dict, m: int) -> Link:
    """Turn T = alpha + beta * bytes, measured for `op` over m ranks, into the ring's per-step latency and
    per-hop bandwidth, so the same link predicts other group sizes."""
    steps, fraction = ring_steps(op, m)
    return Link(fit["alpha_s"] / max(steps, 1), fraction / fit["beta_s_per_byte"])


def measured_hardware(fit: dict, flops: float, m: int, op: str = "all_reduce") -> Hardware:
    """A one-node Hardware from one op's measured fit and a measured matmul FLOP/s (v1 calibration)."""
    link = link_from_fit(op, fit, m)
    return Hardware("measured", flops, 2**40, m, link, link, links={op: link}, can_overlap=False,
                    comm_uses_compute_cores=True, intra_name="loopback", inter_name="loopback")  # fmt: skip


__all__ = ["OPS", "GroupSpan", "Hardware", "Link", "fit_time", "link_from_fit", "measured_hardware", "ring_steps",
           "tail_beta_ratio", "tile_efficiency", "tiled_gemm_s"]  # fmt: skip
