"""Predict what a training layout costs: per-layer compute and communication time, R(m) = T_comm / T_comp,
memory per rank and the step time, for a transformer config on given hardware, and rank the layouts.

The step, as shardwise runs it (every piece from workload.py's op lists, timed by hardware.py, scheduled by
schedule.py):
    micro-batches x [layers x (forward + backward [+ recomputation]) + embedding/head/loss], each with its TP
    collectives on the link class the tp group crosses (topology.py), minus what overlap hides
  + the dp gradient all-reduce (DDP, bucketed, behind the last micro-batch's backward) that is not hidden
  + the optimizer step (Adam at memory bandwidth; ZeRO: 1/dp of it, then an all-gather of the parameters).
Hardware: GPU profiles from spec sheets (profiles.HARDWARE) or `shardwise calibrate` (profiles.from_calibration).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .hardware import OPS, GroupSpan, Hardware, Link, link_from_fit, measured_hardware, ring_steps
from .profiles import HARDWARE, from_calibration
from .schedule import ddp_sync, grad_accumulate_time, optimizer_time, phase_times
from .topology import PLACEMENTS, span
from .workload import (
    PRESETS,
    ModelConfig,
    activation_bytes_per_layer,
    block_config,
    edge_ops,
    gpt_config,
    heads_feasible,
    layer_flops,
    layer_ops,
    local_sizes,
    param_tensors_per_rank,
    params_per_layer,
    params_per_rank,
    tensors_per_layer,
)

RECOMPUTE = ("none", "selective", "full")


@dataclass
class Prediction:
    tp: int
    dp: int
    sequence_parallel: bool
    compute_s: float  # one layer, forward + backward (+ recomputation), one micro-batch
    comm_s: float  # one layer, forward + backward (+ recomputation), one micro-batch: all TP collectives
    R: float  # comm_s / compute_s
    step_s: float  # the whole step for the global batch, including the dp gradient all-reduce and optimizer
    dp_comm_s: float  # the dp gradient all-reduce, all buckets back to back (not overlapped)
    memory: dict
    fits: bool
    tp_spans_nodes: bool
    tokens_per_s: float
    micro_steps: int
    layers: list = field(default_factory=list)  # [{"name", "compute_s", "comm_s", "R"}] per micro-batch
    exposed_comm_s: float = 0.0  # one layer, one micro-batch: the part of comm_s overlap cannot hide
    optimizer_s: float = 0.0
    dp_exposed_s: float = 0.0  # what the dp all-reduce adds to the step (waiting + CPU stretch)
    placement: str = "tp-inner"
    recompute: str = "none"
    overlap: bool = False
    zero: bool = False
    breakdown: dict = field(default_factory=dict)  # step_s split into its parts (they sum to step_s)
    tp_link: str = "none"  # link class the tp group crosses: none | intra | inter | mixed
    dp_link: str = "none"
    dp_hidden_fraction: float = 1.0  # share of dp_comm_s hidden behind the backward

    def to_dict(self) -> dict:
        return asdict(self)


def _validate(cfg: ModelConfig, tp: int, devices: int, placement: str, recompute: str, sp: bool) -> None:
    if tp < 1 or devices % tp:
        raise ValueError(f"tp={tp} does not divide devices={devices}: pick a divisor of the device count")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if sp and tp > 1 and cfg.seq % tp:
        raise ValueError(f"sequence parallelism splits seq={cfg.seq} over tp={tp}: use a multiple of {tp}")


def predict(cfg: ModelConfig, hw: Hardware, tp: int, devices: int | None = None, sequence_parallel: bool = False,
            global_batch: int | None = None, optimizer_bytes_per_param: float | None = None, *,
            placement: str = "tp-inner", recompute: str = "none", overlap: bool = False, optimizer: str = "adam",
            zero: bool = False, bucket_mb: float = 25, micro_batches: int | None = None) -> Prediction:  # fmt: skip
    """Predicted cost of training `cfg` with tensor parallelism `tp` and dp = devices / tp. global_batch:
    sequences per step (default devices * micro_batch, or micro_batches micro-batches per dp rank)."""
    devices = devices or tp
    _validate(cfg, tp, devices, placement, recompute, sequence_parallel)
    if optimizer != "adam":
        raise ValueError(f"optimizer must be 'adam' (the one modelled), got {optimizer!r}")
    dp = devices // tp
    sp = sequence_parallel and tp > 1
    tp_span = span(tp, dp, placement, "tp", hw.devices_per_node)
    dp_span = span(tp, dp, placement, "dp", hw.devices_per_node)
    layer = phase_times(layer_ops(cfg, tp, sp), cfg, hw, tp_span, overlap)
    edge = phase_times(edge_ops(cfg, tp, sp), cfg, hw, tp_span, overlap)

    # recomputation runs in backward: full re-runs the layer's forward (with its collectives), selective the
    # attention core (already what flash attention's backward does)
    rec_compute = layer.fwd_compute if recompute == "full" else 0.0
    if recompute == "selective" and not cfg.flash_attention:
        rec_compute = layer.attn_core_fwd
    rec_comm = layer.fwd_comm if recompute == "full" else 0.0
    if micro_batches is not None:
        global_batch = micro_batches * dp * cfg.micro_batch
    global_batch = global_batch or devices * cfg.micro_batch  # fixed across layouts, as v1
    micro_steps = max(1, math.ceil(global_batch / (dp * cfg.micro_batch)))

    # gradient accumulation: every micro-batch after the first adds its grads into .grad (AccumulateGrad's
    # add_, measured "add" rate); averaged over the micro-batches
    accumulate = (micro_steps - 1) / micro_steps * grad_accumulate_time(hw, params_per_layer(cfg, tp),
                                                                        tensors_per_layer(cfg))  # fmt: skip
    compute = layer.compute + rec_compute + accumulate
    comm = layer.comm + rec_comm
    exposed = comm - layer.hidden
    edge_exposed = edge.comm - edge.hidden
    micro = cfg.layers * (compute + exposed) + edge.compute + edge_exposed

    # grads in backward order: head's norm, then each layer's, the tied embedding's last
    P = params_per_rank(cfg, tp)
    e = cfg.dtype_bytes
    layer_bwd = layer.bwd_compute + rec_compute + layer.bwd_comm + rec_comm - layer.hidden
    head_bwd = edge.bwd_compute + edge.bwd_comm - edge.hidden
    backward = cfg.layers * layer_bwd + head_bwd
    L = local_sizes(cfg, tp, sp)
    per_layer = (P - L.vocab * cfg.hidden) / max(cfg.layers, 1)
    ready = [(head_bwd / 2, (1 if cfg.rmsnorm else 2) * cfg.hidden * e)]
    ready += [(head_bwd / 2 + (i + 1) * layer_bwd, per_layer * e) for i in range(cfg.layers)]
    ready.append((backward, L.vocab * cfg.hidden * e))
    sync = ddp_sync(hw, dp_span, ready, backward, bucket_mb)

    shard = dp if zero else 1
    opt_s = optimizer_time(hw, P / shard, param_tensors_per_rank(cfg), e)
    zero_s = hw.collective("all_gather", P * e, dp_span) if zero and dp > 1 else 0.0
    step = micro_steps * micro + sync.exposed_s + opt_s + zero_s

    state = optimizer_bytes_per_param if optimizer_bytes_per_param is not None else 8 + (4 if e < 4 else 0)
    memory = {
        "params": P * e,
        "grads": P * e,
        "optimizer": P * state / shard,
        "activations": cfg.layers * activation_bytes_per_layer(cfg, tp, sp, recompute),
        "logits": 2 * L.tokens * L.vocab * 4 if cfg.vocab > 1 else 0.0,  # fp32 logits + the loss's softmax
        "ddp_buckets": P * e if dp > 1 else 0.0,
    }
    memory["total"] = sum(memory.values())
    layers = [{"name": f"blocks.{i}", "compute_s": compute, "comm_s": comm, "R": comm / compute if compute else 0.0}
              for i in range(cfg.layers)]  # fmt: skip
    layers.append({"name": "embed+head", "compute_s": edge.compute, "comm_s": edge.comm,
                   "R": edge.comm / edge.compute if edge.compute else 0.0})  # fmt: skip
    breakdown = {
        "compute": micro_steps * (cfg.layers * compute + edge.compute),
        "tp_comm_exposed": micro_steps * (cfg.layers * exposed + edge_exposed),
        "dp_exposed": sync.exposed_s,
        "optimizer": opt_s,
        "zero_gather": zero_s,
    }
    return Prediction(
        tp=tp, dp=dp, sequence_parallel=sp, compute_s=compute, comm_s=comm, R=comm / compute if compute else math.inf,
        step_s=step, dp_comm_s=sync.comm_s, memory=memory, fits=memory["total"] <= 0.9 * hw.memory,
        tp_spans_nodes=tp_span.klass in ("inter", "mixed"), tokens_per_s=global_batch * cfg.seq / step,
        micro_steps=micro_steps, layers=layers, exposed_comm_s=exposed, optimizer_s=opt_s,
        dp_exposed_s=sync.exposed_s, placement=placement, recompute=recompute, overlap=bool(overlap and tp > 1),
        zero=bool(zero and dp > 1), breakdown=breakdown, tp_link=tp_span.klass, dp_link=dp_span.klass,
        dp_hidden_fraction=sync.hidden_fraction,
    )  # fmt: skip


def _choices(value, default: tuple) -> tuple:
    return default if value is None else (value,)


def plan(cfg: ModelConfig, hw: Hardware, devices: int, sequence_parallel: bool | None = None,
         global_batch: int | None = None, *, placement: str | None = None, recompute: str | None = None,
         overlap: bool | None = None, zero: bool | None = None, bucket_mb: float = 25,
         micro_batches: int | None = None) -> list[Prediction]:  # fmt: skip
    """Every layout (tp dividing `devices` that splits the heads; placement, sequence parallelism, recomputation,
    overlap where the hardware can overlap, ZeRO), best (shortest step) first, those that do not fit in memory
    last. An option left None is tried both/all ways; a given one is fixed. Equal steps (to 6 digits) prefer the
    simpler layout, then the smaller memory."""
    options = []
    for tp in (t for t in range(1, devices + 1) if devices % t == 0):
        if not heads_feasible(cfg, tp)[0]:
            continue
        dp = devices // tp
        placements = _choices(placement, PLACEMENTS if tp > 1 and dp > 1 else ("tp-inner",))
        sps = _choices(sequence_parallel, (False, True)) if tp > 1 and cfg.seq % tp == 0 else (False,)
        overlaps = _choices(overlap, (False, True)) if tp > 1 and hw.can_overlap else (False,)
        zeros = _choices(zero, (False, True)) if dp > 1 else (False,)
        for pl in placements:
            for sp in sps:
                for rc in _choices(recompute, RECOMPUTE):
                    for ov in overlaps:
                        for z in zeros:
                            options.append(predict(cfg, hw, tp, devices, sp, global_batch, placement=pl,
                                                   recompute=rc, overlap=ov, zero=z, bucket_mb=bucket_mb,
                                                   micro_batches=micro_batches))  # fmt: skip

    def complexity(p: Prediction) -> int:
        return RECOMPUTE.index(p.recompute) * 4 + p.zero * 2 + p.overlap + (p.placement != "tp-inner")

    return sorted(options, key=lambda p: (not p.fits, float(f"{p.step_s:.6g}"), complexity(p), p.memory["total"]))


def best_chunks(alpha_s: float, beta_s_per_byte: float, nbytes: float, compute_s: float, max_chunks: int = 16,
                chunk_overhead_s: float = 0.0) -> int:  # fmt: skip
    """Chunks k for overlapping a collective of `nbytes` with `compute_s` of matmul split alike: the pipeline
    takes about max(T_comm(k), T_comp(k)) per chunk plus one exposed chunk, where each chunk pays the latency
    alpha again and a smaller GEMM loses `chunk_overhead_s` (launch, lower efficiency). The k of least time."""

    def total(k: int) -> float:
        comm_chunk = alpha_s + beta_s_per_byte * nbytes / k
        comp_chunk = compute_s / k + chunk_overhead_s
        return (k - 1) * max(comm_chunk, comp_chunk) + comm_chunk + comp_chunk

    return min(range(1, max_chunks + 1), key=total)


__all__ = ["HARDWARE", "OPS", "PLACEMENTS", "PRESETS", "RECOMPUTE", "GroupSpan", "Hardware", "Link", "ModelConfig",
           "Prediction", "activation_bytes_per_layer", "best_chunks", "block_config", "from_calibration",
           "gpt_config", "heads_feasible", "layer_flops", "link_from_fit", "measured_hardware", "plan", "predict",
           "ring_steps"]  # fmt: skip
