"""`shardwise train --adaptive` across a slow emulated link (the CI scenario of adaptive TP: 2 nodes x 1 rank).

One torchrun job across 2 lab nodes at 20 Mbit/s, starting at tp=1 x dp=2 (DDP's gradient all-reduce crosses the
link every step), with the recorded 2x1 lab calibration (taken at 1 Gbit/s). The run must see the link's rate in
its own collectives (no probes), predict that tp=2 (small activation all-reduces across the link) is faster by a
decisive margin (2.3x predicted), switch live (in memory, at a step boundary) and keep training at tp=2 to the end,
with every decision logged. Mutants it catches: an estimator that never forgets the calibrated rate (no switch),
a controller that ignores the decision (steps stay at tp1dp2), a reshard that breaks training (non-finite or
exploding loss, or a rank dying).
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN)")

RECORDED = Path(__file__).resolve().parents[2] / "bench" / "results" / "planner-2026-11-22.json"


def test_adaptive_training_switches_to_tp_across_a_slow_link(tmp_path):
    from shardwise.commands.train import shakespeare_text
    from shardwise.lab import Fabric

    rec = json.loads(RECORDED.read_text())
    cal = next(s for s in rec["scenarios"] if s["scenario"] == "2x1")["rates"]["1gbit"]["calibration"]
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    text = tmp_path / "text.txt"  # the lab's nodes have no network: a local text
    text.write_bytes(shakespeare_text().encode("utf-8")[:200_000])
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "shardwise", "train", "--tp", "1", "--dp", "2", "--steps", "30", "--hidden", "64",
            "--layers", "2", "--heads", "4", "--batch", "2", "--seq", "32", "--lr", "1e-3", "--text", str(text),
            "--out", str(out), "--no-progress", "--eval-every", "0", "--checkpoint-every", "0", "--adaptive",
            "--calibration", str(tmp_path / "cal.json"), "--replan-every", "5", "--timeout-s", "60"]  # fmt: skip
    with Fabric(nodes=2, rate="20mbit") as fab:
        res = fab.torchrun(argv, procs_per_node=1, env={"OMP_NUM_THREADS": "1"}, timeout_s=150)
    assert res.ok, "\n".join(log[-3000:] for log in res.logs)

    records = [json.loads(line) for line in (out / "adaptive.jsonl").read_text().splitlines()]
    switches = [r for r in records if r["kind"] == "switch"]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert [(s["from"], s["to"]) for s in switches] == [("tp1dp2-tp-inner", "tp2dp1-tp-inner")], records
    first = next(d for d in decisions if d["switch_to"])
    assert first["predicted_s"]["tp1dp2-tp-inner"] > 1.5 * first["predicted_s"]["tp2dp1-tp-inner"], first
    inter = first["estimates"].get("inter") or first["estimates"].get("mixed")
    assert inter["bandwidth_Bps"] * 8 < 100e6, first  # it saw a slow link (20 Mbit/s shaped), not the 1 Gbit/s prior
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 31))
    at = switches[0]["step"]
    assert at <= 25 and {s["layout"] for s in steps if s["step"] > at} == {"tp2dp1-tp-inner"}, (at, steps)
    assert {s["layout"] for s in steps if s["step"] <= at} == {"tp1dp2-tp-inner"}
    losses = [s["loss"] for s in steps]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses  # still learning after it
