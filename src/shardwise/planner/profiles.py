"""Hardware the planner knows: GPU profiles from spec sheets, and a `shardwise calibrate` JSON read back.

GPU profiles: peak dense bf16 tensor FLOP/s, SM count, HBM bandwidth and capacity, NVLink/PCIe bandwidth per
direction (half the bidirectional figure NVIDIA quotes) and the NIC rate per GPU, each from the spec sheet named
in the profile's note. Not on any spec sheet, and taken as orders of magnitude: the per-step latency of a ring
(NCCL: a few us inside a node, ~10 us across), a kernel launch (~4 us), the 128 x 128 output tile of a cuBLAS
kernel. Nothing here is fitted to anyone's measured scaling.
"""

from __future__ import annotations

import json
import math

from .hardware import Hardware, Link, link_from_fit, tail_beta_ratio

GB = 1e9
LAUNCH_S = 4e-6  # CUDA kernel launch, order of magnitude


def _gpu(name, tflops, sms, hbm_tbps, mem_gib, nvlink_gbps, nic_gbps, nics, note, intra_name, inter_name,
         intra_latency=5e-6, inter_latency=10e-6) -> Hardware:  # fmt: skip
    return Hardware(name, tflops * 1e12, mem_gib * 2**30, 8, Link(intra_latency, nvlink_gbps * GB),
                    Link(inter_latency, nic_gbps * GB), note, memory_bandwidth=hbm_tbps * 1e12,
                    op_overhead_s=LAUNCH_S, sms=sms, node_link_flows=nics, fused_optimizer=True,
                    intra_name=intra_name, inter_name=inter_name)  # fmt: skip


_V100 = "NVIDIA V100 SXM2 datasheet: 125 TFLOPS fp16 tensor, 80 SMs, 900 GB/s HBM2, 32 GB, NVLink 300 GB/s"
_A100 = "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 108 SMs, 2039 GB/s HBM2e, 80 GB, NVLink 600 GB/s"
_A100P = "NVIDIA A100 PCIe datasheet: 312 TFLOPS bf16 dense, 108 SMs, 1935 GB/s, 80 GB, PCIe Gen4 x16 64 GB/s"
_H100 = "NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense, 132 SMs, 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s"
_B200 = "NVIDIA DGX B200 datasheet: 2.25 PFLOPS bf16 dense/GPU, 148 SMs, 8 TB/s HBM3e, 180 GB, NVLink 1.8 TB/s"
HARDWARE = {
    "v100-nvlink": _gpu("v100-nvlink", 125, 80, 0.9, 32, 150, 12.5, 4,
                        _V100 + "; DGX-1: 4x EDR InfiniBand 100 Gb/s", "NVLink 2", "EDR InfiniBand"),
    "a100-nvlink": _gpu("a100-nvlink", 312, 108, 2.039, 80, 300, 25, 8,
                        _A100 + "; DGX A100: 8x HDR InfiniBand 200 Gb/s", "NVLink 3 / NVSwitch", "HDR InfiniBand"),
    "a100-pcie": _gpu("a100-pcie", 312, 108, 1.935, 80, 32, 12.5, 1,
                      _A100P + "; one 100 Gb/s Ethernet NIC per node", "PCIe Gen4", "100G Ethernet",
                      intra_latency=10e-6, inter_latency=15e-6),
    "h100-nvlink": _gpu("h100-nvlink", 989, 132, 3.35, 80, 450, 50, 8,
                        _H100 + "; DGX H100: 8x ConnectX-7 NDR 400 Gb/s", "NVLink 4 / NVSwitch", "NDR InfiniBand"),
    "h100-nvlink-100g": _gpu("h100-nvlink-100g", 989, 132, 3.35, 80, 450, 12.5, 1,
                             _H100 + "; one 100 Gb/s Ethernet NIC per node", "NVLink 4 / NVSwitch",
                             "100G Ethernet", inter_latency=15e-6),
    "b200-nvlink": _gpu("b200-nvlink", 2250, 148, 8.0, 180, 900, 50, 8,
                        _B200 + "; 8x ConnectX-7 400 Gb/s", "NVLink 5 / NVSwitch", "NDR InfiniBand"),
}  # fmt: skip


def interpolate_gemm(points: list[dict], m: int, k: int, n: int, phase: str) -> float:
    """Seconds of a GEMM [m, k] x [k, n] from a measured grid (each point: m, k, n, fwd_s, bwd_s): the two
    nearest points in log-shape space, each scaled by FLOPs (their efficiency carried over), weighted by
    inverse distance. Used when planner.calibration has no gemm_time of its own."""
    key = "bwd_s" if phase == "bwd" else "fwd_s"

    def dist(p):
        return math.dist((math.log(p["m"]), math.log(p["k"]), math.log(p["n"])), (math.log(m), math.log(k),
                                                                                  math.log(n)))  # fmt: skip

    near = sorted(points, key=dist)[:2]
    weights = [1 / (dist(p) + 1e-9) for p in near]
    scaled = [p[key] * (m * k * n) / (p["m"] * p["k"] * p["n"]) for p in near]
    return sum(w * t for w, t in zip(weights, scaled, strict=True)) / sum(weights)


def _gemm_fn(cal: dict):
    """(m, k, n, phase) -> seconds from the calibration's grid: calibration.gemm_time when it exists."""
    try:
        from .calibration import gemm_time
    except ImportError:
        points = cal["gemm"]["points"]
        return lambda m, k, n, phase: interpolate_gemm(points, m, k, n, phase)
    return lambda m, k, n, phase: gemm_time(cal, m, k, n, phase)


def _load(path: str) -> dict:
    try:
        from .calibration import load_calibration
    except ImportError:
        with open(path) as f:
            return json.load(f)
    return load_calibration(path)


def from_calibration(path_or_dict) -> Hardware:
    """Hardware measured by `shardwise calibrate` (JSON v2, or v1 one-node files): per (link class, op, group
    size) alpha-beta fits, the GEMM grid, memory bandwidth and op overhead. A gloo calibration describes CPUs:
    collectives block the compute thread (no TP overlap) and a background all-reduce takes CPU from compute."""
    cal = path_or_dict if isinstance(path_or_dict, dict) else _load(path_or_dict)
    if cal.get("version", 1) < 2:
        return _from_v1(cal)
    fits = {}
    for klass, ops in cal.get("collectives", {}).items():
        for op, sizes in ops.items():
            for size, f in sizes.items():
                # files written before the calibration stored the ratio; a stored one is kept, as it was measured
                # against the calibration's own beta (a copy with beta scaled to a slower link must scale the tail)
                if f.get("residuals") and "tail_beta_ratio" not in f:
                    f = {**f, "tail_beta_ratio": tail_beta_ratio(f)}
                fits[(klass, op, int(size))] = f
    if not fits:
        raise ValueError("calibration has no collective fits: run `shardwise calibrate` with --ranks >= 2")
    points = cal.get("gemm", {}).get("points", [])
    flops = max((2 * p["m"] * p["k"] * p["n"] / p["fwd_s"] for p in points), default=1e10)
    gloo = cal.get("backend", "gloo") == "gloo"

    def rep(klass: str) -> Link:
        sized = sorted((m, f) for (c, op, m), f in fits.items() if c == klass and op == "all_reduce")
        if not sized:
            return Link(1e-4, 1e9)
        m, f = sized[0]
        link = link_from_fit("all_reduce", f, m)
        return Link(link.latency_s, link.bandwidth * (f.get("concurrent_groups", 1) if klass == "inter" else 1))

    rate = cal.get("link_rate") or "unshaped"
    over = cal.get("overhead") or {}
    attention = None
    if (cal.get("attention") or {}).get("points"):
        from .calibration_kernels import attention_time

        attention = lambda s, d, units, phase: attention_time(cal, s, d, units, phase)  # noqa: E731
    return Hardware(
        f"calibrated:{cal.get('host', 'here')}", flops, cal.get("memory_bytes", 16 * 2**30),
        cal.get("procs_per_node", cal.get("world", 2)), rep("intra"), rep("inter"),
        f"calibrated {cal.get('date', '')}, {cal.get('world')} ranks on {cal.get('nodes', 1)} node(s), "
        f"{cal.get('backend', 'gloo')}, node link {rate}",
        memory_bandwidth=cal.get("memory_bandwidth_Bps"), op_overhead_s=cal.get("op_overhead_s") or 0.0,
        bwd_op_overhead_s=cal.get("autograd_node_s"),
        skew_per_compute=(cal.get("rank_skew") or {}).get("wait_per_compute_s", 0.0) if gloo else 0.0,
        gemm=_gemm_fn(cal) if points else None, fits=fits, can_overlap=not gloo, comm_uses_compute_cores=gloo,
        intra_name="loopback (same node)", inter_name=f"node link ({rate})", kernels=cal.get("kernels"),
        attention=attention, aten_op_s=over.get("aten_op_s", 0.0), autograd_node_s=over.get("autograd_node_s", 0.0),
        accumulate_grad_s=over.get("accumulate_grad_s", 0.0), post_collective_s=cal.get("post_collective_s", 0.0),
    )  # fmt: skip


def _from_v1(cal: dict) -> Hardware:
    """A v1 file (one node, fits per op at tp ranks, one matmul FLOP/s): as v1 read it."""
    m = cal["tp"]
    links = {op: link_from_fit(op, fit, m) for op, fit in cal["fits"].items()}
    any_link = links.get("all_reduce", next(iter(links.values())))
    return Hardware(f"calibrated:{cal.get('host', 'here')}", cal["matmul_flops"], cal.get("memory_bytes", 16 * 2**30),
                    cal.get("devices_per_node", m), any_link, any_link, f"calibrated {cal.get('date', '')}", links,
                    can_overlap=False, comm_uses_compute_cores=True, intra_name="loopback",
                    inter_name="loopback")  # fmt: skip


__all__ = ["HARDWARE", "from_calibration", "interpolate_gemm"]
