"""Time of the op lists (workload.py) on a Hardware, and what the step's schedule can hide.

Overlap, as the code and the backends behave:
- TP collectives: with `overlap=True` on hardware whose collectives run on their own engine (NCCL streams),
  a column layer's backward input-grad collective runs during its weight-grad GEMMs (layers/overlapped.py,
  chunks=1), so min(comm, dW) is hidden; every other TP collective is on the critical path. On CPU/gloo the
  collectives are blocking calls on the compute thread: nothing is hidden, whatever `overlap` says.
- DDP's dp all-reduce: grads fill buckets in backward order (the first bucket 1 MiB, then bucket_mb), each
  bucket's all-reduce starts when its last grad is ready and the all-reduces run one after another beside the
  backward (its own stream / gloo's background thread); exposed = when the last one ends minus when backward
  ends. The tied embedding's grad is ready only at the very end of backward, so its bucket is always exposed.
  DDP also copies grads into and out of its buckets (4 passes of the grad bytes at memory bandwidth). On CPU
  the background all-reduce is not free: gloo's thread copies and sums the ring chunks (3 passes of the bytes
  it moves at memory bandwidth) on the same cores as compute, so backward is stretched by that much, and the
  stretch counts as dp time. Under gradient accumulation DDP syncs only the last micro-batch (no_sync), so
  only that backward can hide it.
- After a blocking collective the next compute runs slower (calibration's post_collective_s: cold caches, a
  woken thread; 0.2-0.6 ms here, 0 for GPU profiles): added to the compute of the phase it follows.
- Rank skew (calibration's rank_skew, gloo only): ranks sharing oversubscribed cores drift apart, so a blocking
  collective first waits for the slowest rank; that wait grows with the compute since the previous collective
  and is counted as TP communication time (the profiler times it inside the collective too).
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import GroupSpan, Hardware, ring_steps
from .workload import ModelConfig, Op

FIRST_BUCKET_BYTES = 2**20  # torch DDP's first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)


@dataclass
class PhaseTimes:
    """Seconds for one op list (one layer or the edges), one micro-batch."""

    fwd_compute: float = 0.0
    bwd_compute: float = 0.0
    fwd_comm: float = 0.0
    bwd_comm: float = 0.0
    hidden: float = 0.0  # backward comm hidden behind dW (overlap)
    attn_core_fwd: float = 0.0  # what selective recomputation re-runs

    @property
    def compute(self) -> float:
        return self.fwd_compute + self.bwd_compute

    @property
    def comm(self) -> float:
        return self.fwd_comm + self.bwd_comm


def _attention(hw: Hardware, cfg: ModelConfig, op: Op) -> tuple[float, float]:
    """(fwd, bwd) seconds of the attention core. Fused causal SDPA / flash skips the blocks above the diagonal
    (half the QK^T and AV FLOPs) and its backward runs 5 matmuls (S recomputed, dV, dP, dQ, dK) for the
    forward's 2; with scores kept, the full matmuls plus softmax passes over [b, heads, s, s]."""
    s, d, b = op.m, op.k, op.batch
    if cfg.flash_attention and hw.attention is not None:  # measured fused causal SDPA (CPU calibration)
        return hw.attention(s, d, b, "fwd"), hw.attention(s, d, b, "bwd")
    matmuls = hw.gemm_time(s, d, s, "fwd", b) + hw.gemm_time(s, s, d, "fwd", b)
    if cfg.flash_attention:
        fwd = 0.5 * matmuls + hw.elementwise_time(0, 1)
        return fwd, 2.5 * fwd
    scores = b * s * s * cfg.dtype_bytes
    return matmuls + hw.elementwise_time(5 * scores, 3), 2 * matmuls + hw.elementwise_time(3 * scores, 2)


def _elementwise(hw: Hardware, op: Op) -> tuple[float, float]:
    """(fwd, bwd) seconds of an element-wise op: by its measured kind's rate when the calibration has it
    (compute-bound erf / rsqrt / sin-cos and the kernel's own dispatch included), else bytes at memory
    bandwidth; with measured kernels the per-op dispatch of unmeasured ops is in the layer's glue op."""
    glue = bool(hw.kernels)
    specs = {"fwd": f"{op.ew_kind}:fwd" if op.ew_kind else "-",
             "bwd": op.bwd_kind or (f"{op.ew_kind}:bwd" if op.ew_kind else "-")}  # fmt: skip
    out = []
    for phase, nbytes, ops in (("fwd", op.fwd_bytes, op.fwd_ops), ("bwd", op.bwd_bytes, op.bwd_ops)):
        if not nbytes and not ops:
            out.append(0.0)  # nothing in this phase
            continue
        kind, _, rate = specs[phase].partition(":")
        t = None if kind == "-" else hw.kernel_time(kind, op.elems, rate)
        if t is None:
            t = hw.elementwise_time(nbytes, 0 if glue else ops, phase)
        out.append(t)
    return out[0], out[1]


def phase_times(ops: list[Op], cfg: ModelConfig, hw: Hardware, tp_span: GroupSpan, overlap: bool) -> PhaseTimes:
    out = PhaseTimes()
    hideable: dict[str, float] = {}
    cover: dict[str, float] = {}
    for op in ops:
        if op.kind == "gemm":
            out.fwd_compute += hw.gemm_time(op.m, op.k, op.n, "fwd", op.batch)
            out.bwd_compute += hw.gemm_time(op.m, op.k, op.n, "bwd", op.batch)
            if op.hides:
                cover[op.part] = cover.get(op.part, 0.0) + hw.gemm_time(op.m, op.k, op.n, "dw", op.batch)
        elif op.kind == "attn":
            fwd, bwd = _attention(hw, cfg, op)
            out.fwd_compute += fwd
            out.bwd_compute += bwd
            out.attn_core_fwd += fwd
        elif op.kind == "ew":
            fwd, bwd = _elementwise(hw, op)
            out.fwd_compute += fwd
            out.bwd_compute += bwd
        elif op.kind == "glue":  # untimed aten ops and autograd nodes (counted in workload.py)
            out.fwd_compute += hw.glue_time(op.fwd_ops)
            out.bwd_compute += hw.glue_time(op.bwd_ops, op.nodes, op.tensors)
        else:
            t = hw.collective(op.op, op.nbytes, tp_span)
            # the compute after a blocking collective runs slower (calibration: post_collective_s); 0 on GPUs
            if op.phase == "fwd":
                out.fwd_comm += t
                out.fwd_compute += hw.post_collective_s
            else:
                out.bwd_comm += t
                out.bwd_compute += hw.post_collective_s
                if op.hideable and op.part in ("attn", "mlp"):  # the overlapped column layers
                    hideable[op.part] = hideable.get(op.part, 0.0) + t
    if hw.skew_per_compute and tp_span.size > 1 and (out.fwd_comm or out.bwd_comm):
        # every blocking collective first waits for the slowest rank to finish the compute segment before it
        # (oversubscribed cores: ranks drift apart); the segments between collectives make up the compute
        out.fwd_comm += hw.skew_per_compute * out.fwd_compute
        out.bwd_comm += hw.skew_per_compute * out.bwd_compute
    if overlap and hw.can_overlap:
        out.hidden = sum(min(t, cover.get(part, 0.0)) for part, t in hideable.items())
    return out


@dataclass
class DpSync:
    comm_s: float  # all bucket all-reduces back to back
    exposed_s: float  # what the step waits for beyond the backward (incl. the CPU stretch)
    buckets: int
    hidden_fraction: float


def ddp_sync(hw: Hardware, dp_span: GroupSpan, ready: list[tuple[float, float]], backward_s: float,
             bucket_mb: float) -> DpSync:  # fmt: skip
    """`ready`: (seconds into the backward, grad bytes) in the order grads are produced. See the module doc."""
    if dp_span.size <= 1 or not ready:
        return DpSync(0.0, 0.0, 0, 1.0)
    cap, filled, buckets = FIRST_BUCKET_BYTES, 0.0, []
    for when, nbytes in ready:
        left = nbytes
        while left > 0:
            take = min(left, cap - filled)
            filled += take
            left -= take
            if filled >= cap:
                buckets.append((when, filled))
                cap, filled = bucket_mb * 2**20, 0.0
    if filled:
        buckets.append((ready[-1][0], filled))
    total = sum(b for _, b in buckets)
    stretch = 4 * total / hw.memory_bandwidth if hw.memory_bandwidth else 0.0  # bucket copy in + out
    if hw.comm_uses_compute_cores and hw.memory_bandwidth:
        stretch += 3 * ring_steps("all_reduce", dp_span.size)[1] * total / hw.memory_bandwidth
    scale = (backward_s + stretch) / backward_s if backward_s > 0 else 1.0
    end, comm = 0.0, 0.0
    for when, nbytes in buckets:
        t = hw.collective("all_reduce", nbytes, dp_span)
        end = max(end, when * scale) + t
        comm += t
    waited = max(0.0, end - (backward_s + stretch))
    hidden = 1.0 - waited / comm if comm else 1.0
    return DpSync(comm, waited + stretch, len(buckets), hidden)


def grad_accumulate_time(hw: Hardware, params: float, tensors: int) -> float:
    """AccumulateGrad adding one micro-batch's grads into existing .grad tensors: an add_ per tensor at the
    measured cold "accumulate" rate ("add" in older files; 0 without measured kernels: not modelled there)."""
    kind = next((k for k in ("accumulate", "add") if k in (hw.kernels or {})), None)
    if kind is None:
        return 0.0
    alpha, beta = hw.kernels[kind]["fwd"]
    return tensors * alpha + beta * params


def optimizer_time(hw: Hardware, params: float, tensors: int, dtype_bytes: int) -> float:
    """Adam's step over `params` parameters in `tensors` tensors, at memory bandwidth. Fused (GPU): one pass
    reading param, grad, m, v and writing param, m, v (plus the fp32 master when training in 16-bit). torch's
    per-tensor loop (CPU): lerp_ 3, mul_ 2, addcmul_ 4, sqrt 2, div 2, add_ 2, addcdiv_ 4 = 19 fp32 passes and
    ~10 small ops per tensor."""
    if hw.memory_bandwidth is None:
        return 0.0  # v1 hardware: not modelled
    if hw.fused_optimizer:
        per_param = 28 + (2 * dtype_bytes if dtype_bytes < 4 else 0)
        return hw.elementwise_time(per_param * params, 4)
    return hw.elementwise_time(19 * 4 * params, 10 * tensors)


__all__ = ["DpSync", "FIRST_BUCKET_BYTES", "PhaseTimes", "ddp_sync", "grad_accumulate_time", "optimizer_time",
           "phase_times"]  # fmt: skip
