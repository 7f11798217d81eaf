"""Predict what tensor parallelism costs: per-layer compute and communication time, R(m) = T_comm / T_comp,
memory per rank, and the step time of each TP degree, for a transformer config on given hardware.

Communication follows the ring algorithms NCCL and gloo use: for a group of m ranks and a full tensor of
n bytes, an all-reduce moves 2(m-1)/m * n bytes through each link in 2(m-1) steps, an all-gather or
reduce-scatter (m-1)/m * n bytes in m-1 steps, so T = steps * latency + factor * n / bandwidth.
Hardware comes from published figures (HARDWARE) or from `shardwise calibrate` on your own machine,
whose fitted T = alpha + beta * bytes per op is turned back into a link latency and bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

OPS = ("all_reduce", "all_gather", "reduce_scatter")


def ring_steps(op: str, m: int) -> tuple[int, float]:
    """(latency steps, fraction of the full tensor crossing each link) of a ring collective over m ranks."""
    if m <= 1:
        return 0, 0.0
    if op == "all_reduce":
        return 2 * (m - 1), 2 * (m - 1) / m
    return m - 1, (m - 1) / m


@dataclass(frozen=True)
class Link:
    latency_s: float  # per ring step
    bandwidth: float  # bytes/s through one link, one direction

    def time(self, op: str, nbytes: float, m: int) -> float:
        steps, fraction = ring_steps(op, m)
        return steps * self.latency_s + fraction * nbytes / self.bandwidth


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # achievable dense matmul FLOP/s per device at the training dtype
    memory: float  # bytes per device
    devices_per_node: int
    intra: Link  # inside a node
    inter: Link  # between nodes
    note: str = ""
    links: dict = field(default_factory=dict, compare=False)  # op -> Link, from a calibration

    def link(self, op: str, ranks_span_nodes: bool) -> Link:
        if ranks_span_nodes:
            return self.inter
        return self.links.get(op, self.intra)


GB = 1e9
# Published peak figures; "achievable" matmul throughput taken as ~60% of the dense bf16 peak, a
# typical large-GEMM efficiency. Latencies are NCCL's small-message ring step, order of magnitude.
HARDWARE = {
    "h100-nvlink": Hardware("h100-nvlink", 0.6 * 989e12, 80 * 2**30, 8, Link(5e-6, 450 * GB), Link(10e-6, 50 * GB),
                            "H100 SXM, NVLink 4 (450 GB/s per direction), 400 Gb/s InfiniBand between nodes"),
    "h100-nvlink-100g": Hardware("h100-nvlink-100g", 0.6 * 989e12, 80 * 2**30, 8, Link(5e-6, 450 * GB),
                                 Link(15e-6, 12.5 * GB), "H100 SXM, NVLink 4, 100 Gb/s Ethernet between nodes"),
    "a100-nvlink": Hardware("a100-nvlink", 0.6 * 312e12, 80 * 2**30, 8, Link(6e-6, 300 * GB), Link(12e-6, 25 * GB),
                            "A100 SXM, NVLink 3 (300 GB/s per direction), 200 Gb/s InfiniBand between nodes"),
    "a100-pcie": Hardware("a100-pcie", 0.6 * 312e12, 80 * 2**30, 8, Link(10e-6, 25 * GB), Link(15e-6, 12.5 * GB),
                          "A100 PCIe 4.0 x16 (~25 GB/s per direction) inside a node, 100 Gb/s between nodes"),
}  # fmt: skip


def link_from_fit(op: str, fit: dict, m: int) -> Link:
    """Turn T = alpha + beta * bytes, measured for `op` over m ranks, into the ring's per-step latency
    and per-link bandwidth, so the same link predicts other group sizes."""
    steps, fraction = ring_steps(op, m)
    return Link(fit["alpha_s"] / max(steps, 1), fraction / fit["beta_s_per_byte"])


def measured_hardware(fit: dict, flops: float, m: int, op: str = "all_reduce") -> Hardware:
    """A one-node Hardware from one op's measured fit and a measured matmul FLOP/s."""
    link = link_from_fit(op, fit, m)
    return Hardware("measured", flops, 2**40, m, link, link, links={op: link})


def from_calibration(path: str) -> Hardware:
    """Hardware measured here by `shardwise calibrate`: one link per op (fitted at the calibrated group
    size), the matmul FLOP/s measured at the layer shapes, one node."""
    with open(path) as f:
        cal = json.load(f)
    m = cal["tp"]
    links = {op: link_from_fit(op, fit, m) for op, fit in cal["fits"].items()}
    flops = cal["matmul_flops"]
    any_link = links.get("all_reduce", next(iter(links.values())))
    return Hardware(f"calibrated:{cal.get('host', 'here')}", flops, cal.get("memory_bytes", 16 * 2**30),
                    cal.get("devices_per_node", m), any_link, any_link, f"calibrated {cal.get('date', '')}",
                    links)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    seq: int
    micro_batch: int = 1
    dtype_bytes: int = 2  # bf16 activations and weights
    swiglu: bool = True
    flash_attention: bool = True  # attention scores not kept for backward

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads * d) * 2 + h * (self.kv_heads * d) * 2
        mlp = h * self.ffn * (3 if self.swiglu else 2)
        return attn + mlp + 2 * h  # + norms

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + self.vocab * self.hidden * 2 + self.hidden

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        known = {f for f in ModelConfig.__dataclass_fields__}
        return ModelConfig(**{k: v for k, v in d.items() if k in known})


PRESETS = {
    "llama-7b": ModelConfig(hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32, vocab=32000, seq=4096),
    "llama3-8b": ModelConfig(hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=32, vocab=128256, seq=8192),
    "llama-13b": ModelConfig(hidden=5120, ffn=13824, heads=40, kv_heads=40, layers=40, vocab=32000, seq=4096),
    "llama-70b": ModelConfig(hidden=8192, ffn=28672, heads=64, kv_heads=8, layers=80, vocab=32000, seq=4096),
    "smollm2-135m": ModelConfig(hidden=576, ffn=1536, heads=9, kv_heads=3, layers=30, vocab=49152, seq=2048),
}


def block_config(hidden: int, heads: int, seq: int, batch: int) -> ModelConfig:
    """The GPT block of the scaling benchmark: GELU MLP of 4h, MHA, fp32, scores kept (plain SDPA)."""
    return ModelConfig(hidden=hidden, ffn=4 * hidden, heads=heads, kv_heads=heads, layers=1, vocab=1, seq=seq,
                       micro_batch=batch, dtype_bytes=4, swiglu=False, flash_attention=False)  # fmt: skip


def layer_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of one transformer layer for one micro-batch (2 per multiply-add)."""
    tokens, h, d = cfg.micro_batch * cfg.seq, cfg.hidden, cfg.head_dim
    projections = 2 * tokens * h * (2 * cfg.heads * d + 2 * cfg.kv_heads * d)
    attention = 2 * 2 * tokens * cfg.seq * cfg.heads * d  # QK^T and AV over the full sequence
    mlp = 2 * tokens * h * cfg.ffn * (3 if cfg.swiglu else 2)
    return projections + attention + mlp


@dataclass
class Prediction:
    tp: int
    dp: int
    sequence_parallel: bool
    compute_s: float  # one layer, forward + backward, one micro-batch
    comm_s: float  # one layer, forward + backward, one micro-batch (not overlapped)
    R: float
    step_s: float  # the whole step for the global batch, including the dp gradient all-reduce
    dp_comm_s: float
    memory: dict
    fits: bool
    tp_spans_nodes: bool
    tokens_per_s: float
    micro_steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes_per_layer(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> float:
    """Bytes kept for backward by one layer (Korthikanti et al. 2022, 16-bit activations):
    s*b*h*(10 + 24/t) without sequence parallelism, s*b*h*34/t with it, plus 5*a*s^2*b/t for the
    attention scores unless flash attention recomputes them."""
    sbh = cfg.seq * cfg.micro_batch * cfg.hidden * cfg.dtype_bytes / 2
    base = sbh * (34 / tp if sequence_parallel else 10 + 24 / tp)
    scores = 0 if cfg.flash_attention else 5 * cfg.heads * cfg.seq**2 * cfg.micro_batch / tp
    return base + scores


def predict(cfg: ModelConfig, hw: Hardware, tp: int, devices: int | None = None, sequence_parallel: bool = False,
            global_batch: int | None = None, optimizer_bytes_per_param: int = 12) -> Prediction:  # fmt: skip
    """Predicted cost of training `cfg` with tensor parallelism `tp` (and dp = devices / tp)."""
    devices = devices or tp
    if devices % tp:
        raise ValueError(f"tp={tp} does not divide devices={devices}")
    dp = devices // tp
    tp_spans_nodes = tp > hw.devices_per_node
    dp_spans_nodes = devices > hw.devices_per_node
    compute = 3 * layer_flops(cfg) / tp / hw.flops  # backward costs twice the forward
    act = cfg.micro_batch * cfg.seq * cfg.hidden * cfg.dtype_bytes  # one [b, s, h] tensor, full size
    if sequence_parallel:
        comm = 4 * hw.link("all_gather", tp_spans_nodes).time("all_gather", act, tp)
        comm += 4 * hw.link("reduce_scatter", tp_spans_nodes).time("reduce_scatter", act, tp)
    else:
        comm = 4 * hw.link("all_reduce", tp_spans_nodes).time("all_reduce", act, tp)
    global_batch = global_batch or devices * cfg.micro_batch
    micro_steps = max(1, math.ceil(global_batch / (dp * cfg.micro_batch)))
    # Embedding (fwd all-reduce) and output layer (bwd all-reduce) once per micro-batch; its compute.
    edge_comm = 2 * hw.link("all_reduce", tp_spans_nodes).time("all_reduce", act, tp)
    edge_compute = 3 * 2 * cfg.micro_batch * cfg.seq * cfg.hidden * cfg.vocab / tp / hw.flops
    micro = cfg.layers * (compute + comm) + edge_comm + edge_compute
    params_per_rank = cfg.params / tp
    grad_bytes = params_per_rank * cfg.dtype_bytes
    dp_comm = hw.link("all_reduce", dp_spans_nodes).time("all_reduce", grad_bytes, dp)
    step = micro_steps * micro + dp_comm
    memory = {
        "params": params_per_rank * cfg.dtype_bytes,
        "grads": grad_bytes,
        "optimizer": params_per_rank * optimizer_bytes_per_param,
        "activations": cfg.layers * activation_bytes_per_layer(cfg, tp, sequence_parallel),
    }
    memory["total"] = sum(memory.values())
    return Prediction(
        tp=tp, dp=dp, sequence_parallel=sequence_parallel, compute_s=compute, comm_s=comm,
        R=comm / compute if compute else math.inf, step_s=step, dp_comm_s=dp_comm, memory=memory,
        fits=memory["total"] <= 0.9 * hw.memory, tp_spans_nodes=tp_spans_nodes,
        tokens_per_s=global_batch * cfg.seq / step, micro_steps=micro_steps,
    )  # fmt: skip


def heads_feasible(cfg: ModelConfig, tp: int) -> tuple[bool, str]:
    if tp > cfg.heads:
        return False, f"tp={tp} > {cfg.heads} heads"
    if cfg.heads % tp or cfg.kv_heads % tp and tp % cfg.kv_heads:
        return True, "uneven heads (whole heads per rank; kv heads shared)"
    return True, "even"


def plan(cfg: ModelConfig, hw: Hardware, devices: int, sequence_parallel: bool | None = None,
         global_batch: int | None = None) -> list[Prediction]:  # fmt: skip
    """Every TP degree dividing `devices` that splits the heads, best (shortest step) first; those
    that do not fit in memory last. sequence_parallel=None tries both and keeps the better."""
    options = []
    for tp in (t for t in range(1, devices + 1) if devices % t == 0):
        ok, _ = heads_feasible(cfg, tp)
        if not ok:
            continue
        tries = (False, True) if sequence_parallel is None else (sequence_parallel,)
        preds = [predict(cfg, hw, tp, devices, sp, global_batch) for sp in tries]
        # Sequence parallelism moves the same bytes and saves activation memory: prefer it when it fits
        # better or is no slower.
        best = min(preds, key=lambda p: (not p.fits, round(p.step_s, 9), p.memory["total"]))
        options.append(best)
    return sorted(options, key=lambda p: (not p.fits, p.step_s))


def best_chunks(alpha_s: float, beta_s_per_byte: float, nbytes: float, compute_s: float, max_chunks: int = 16,
                chunk_overhead_s: float = 0.0) -> int:  # fmt: skip
    """Chunks k for overlapping a collective of `nbytes` with `compute_s` of matmul split alike:
    the pipeline takes about max(T_comm(k), T_comp(k)) per chunk plus one exposed chunk, where each
    chunk pays the latency alpha again and a smaller GEMM loses `chunk_overhead_s` (launch, lower
    efficiency). Picks the k with the least predicted time."""

    def total(k: int) -> float:
        comm_chunk = alpha_s + beta_s_per_byte * nbytes / k
        comp_chunk = compute_s / k + chunk_overhead_s
        return (k - 1) * max(comm_chunk, comp_chunk) + comm_chunk + comp_chunk

    return min(range(1, max_chunks + 1), key=total)


__all__ = ["HARDWARE", "PRESETS", "Hardware", "Link", "ModelConfig", "Prediction", "best_chunks",
           "from_calibration", "plan", "predict"]  # fmt: skip
