"""Synthetic collective traces for the adaptive tests: events with a known ring link (per-step latency, rate)
and this machine's kind of noise."""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from shardwise.comm.events import CollectiveEvent
from shardwise.data_parallel import DP_TAG
from shardwise.planner.hardware import ring_steps
from shardwise.planner.profiles import from_calibration
from shardwise.planner.workload import gpt_config

try:
    from shardwise.live_reshard import Layout
except ImportError:  # helper A's module not there yet: the documented interface

    @dataclass(frozen=True)
    class Layout:
        tp: int
        dp: int
        placement: str = "tp-inner"
        sequence_parallel: bool = False

        @property
        def name(self) -> str:
            return f"tp{self.tp}dp{self.dp}-{self.placement}{'+sp' if self.sequence_parallel else ''}"


ROOT = Path(__file__).resolve().parents[2]
# the lab's 2 nodes x 1 rank, GPT h=256 (bench/PLANNER.md): calibrated at a 1 Gbit/s node link
LAB_CFG = gpt_config({"hidden": 256, "num_heads": 8, "num_layers": 2, "vocab_size": 512}, seq=64, micro_batch=1,
                     dtype_bytes=4)  # fmt: skip
LAB_BATCH = 4
DP, TP, TP_SP = Layout(1, 2), Layout(2, 1), Layout(2, 1, sequence_parallel=True)


def lab_hardware():
    rec = json.loads((ROOT / "bench/results/planner-2026-11-22.json").read_text())
    sc = next(s for s in rec["scenarios"] if s["scenario"] == "2x1")
    return from_calibration(sc["rates"]["1gbit"]["calibration"])


def true_time(op: str, m: int, nbytes: int, latency_s: float, rate_Bps: float, flows: int = 1) -> float:
    steps, fraction = ring_steps(op, m)
    return steps * latency_s + fraction * nbytes * flows / rate_Bps


def event(op: str, m: int, nbytes: int, seconds: float, tag: str = "blocks.0.attn", dp: bool = False):
    """A finished collective as the choke point reports it; dp=True: DDP's async bucket (time in inflight_s)."""
    if dp:
        return CollectiveEvent(op, m, nbytes // 4, nbytes, torch.float32, seconds * 0.05, DP_TAG, "bwd",
                               wait_s=0.0, inflight_s=seconds, async_op=True)  # fmt: skip
    return CollectiveEvent(op, m, nbytes // 4, nbytes, torch.float32, seconds, tag, "fwd")


def skew(rng: random.Random, spread: float, outliers: float = 0.05) -> float:
    """Skew only adds (a blocking call waits for the slowest rank): 1 + U(0, spread), x3 with prob `outliers`."""
    return (1 + rng.uniform(0, spread)) * (3.0 if rng.random() < outliers else 1.0)


def machine_noise(rng: random.Random) -> float:
    """This machine's noise on a step or a collective: +-40% multiplicative, a 3x outlier one time in 20."""
    return rng.uniform(0.6, 1.4) * (3.0 if rng.random() < 0.05 else 1.0)


TP_OPS = [("all_reduce", 64 * 1024), ("all_reduce", 256 * 1024), ("all_gather", 1024 * 1024)]


def tp_events(rng, latency_s, rate_Bps, noise, n: int = 1, m: int = 2):
    """n rounds of TP traffic (three sizes, two ops) at the given link, times x noise(rng)."""
    return [event(op, m, b, true_time(op, m, b, latency_s, rate_Bps) * noise(rng)) for _ in range(n)
            for op, b in TP_OPS]  # fmt: skip


def dp_events(rng, latency_s, rate_Bps, noise, n: int = 1, nbytes: int = 4 * 2**20, m: int = 2):
    return [event("all_reduce", m, nbytes, true_time("all_reduce", m, nbytes, latency_s, rate_Bps) * noise(rng),
                  dp=True) for _ in range(n)]  # fmt: skip
