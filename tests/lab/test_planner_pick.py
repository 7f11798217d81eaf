"""The planner's pick against a measurement in the fabric lab (the CI scenario: 2 nodes x 1 rank, one shaped rate).

One torchrun job across 2 emulated nodes: a quick in-lab calibration (calibrate_here), then a small GPT training
step (bench/lab_step.py) as tp=2 (every activation all-reduce crosses the link) and as dp=2 (DDP's gradient
all-reduce crosses it). The workload has many parameters per activation byte, so at this rate the two differ by a
decisive, many-x margin; the planner (plan() from that calibration) must put the measured faster one first. This is
the suite's one timing-dependent check, kept to a margin noise on a shared 2-core machine cannot close.
Mutants it catches: the comm model ignored or scaled away (checked in the test itself: such a model picks dp),
the planner's ordering reversed (picks the slower layout).
"""

import copy
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN)")

LAB_STEP = Path(__file__).resolve().parents[2] / "bench" / "lab_step.py"
RATE = "40mbit"
WORK = {"hidden": 128, "layers": 2, "heads": 4, "vocab": 256, "seq": 32, "global_batch": 2, "micro_batch": 1}
DECISIVE = 2.0  # predicted slower / faster layout at RATE
ATTEMPTS = 3  # calibrate-and-measure jobs before a non-decisive model fails the test


def planner_pick(cal: dict) -> list:
    """plan()'s layouts for this workload on 2 devices from the calibration, best first (no SP/ZeRO/recompute)."""
    from shardwise.costmodel import from_calibration, plan

    from shardwise.planner.workload import gpt_config

    gpt = {"hidden": WORK["hidden"], "num_heads": WORK["heads"], "num_layers": WORK["layers"],
           "vocab_size": WORK["vocab"]}  # fmt: skip
    cfg = gpt_config(gpt, seq=WORK["seq"], micro_batch=WORK["micro_batch"], dtype_bytes=4)
    return plan(cfg, from_calibration(cal), 2, sequence_parallel=False, global_batch=WORK["global_batch"],
                recompute="none", overlap=False, zero=False)  # fmt: skip


def without_comm(cal: dict) -> dict:
    """The calibration with every collective ~free (alpha and beta / 1000): a model that ignores communication."""
    cal = copy.deepcopy(cal)
    for ops in cal["collectives"].values():
        for sizes in ops.values():
            for fit in sizes.values():
                for part in (fit, fit.get("transfer_fit")):
                    if isinstance(part, dict):
                        for name in ("alpha_s", "beta_s_per_byte"):
                            if name in part:
                                part[name] *= 1e-3
                fit["residuals"] = [[n, r * 1e-3] for n, r in fit.get("residuals", [])]  # seconds, as alpha
    return cal


def test_planner_picks_the_measured_best_layout_across_a_slow_link(tmp_path):
    from shardwise.lab import Fabric

    out, cal_path = tmp_path / "step.json", tmp_path / "cal.json"
    argv = [sys.executable, str(LAB_STEP), "--layout", "2:1", "--layout", "1:2", "--steps", "3", "--warmup", "1",
            "--profile-steps", "0", "--calibrate", str(cal_path), "--out", str(out), "--timeout-s", "100"]  # fmt: skip
    for k, v in WORK.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    # The quick in-lab calibration (3 calls per size) is noisy at this rate: over 5 runs on 2026-11-22 it put tp=2
    # at 83, 86, 143, 320 (CI) ms against 77-82 measured, as a token bucket lets some calls through at burst speed.
    # The test's subject is the pick from a decisive model, so a non-decisive calibration is taken again (at most
    # ATTEMPTS jobs, each calibrating and measuring afresh), every attempt reported on failure.
    attempts = []
    with Fabric(nodes=2, rate=RATE) as fab:
        for _ in range(ATTEMPTS):
            res = fab.torchrun(argv, procs_per_node=1, env={"THP_MEM_ALLOC_ENABLE": "1"}, timeout_s=120)
            assert res.ok, "\n".join(log[-2000:] for log in res.logs)
            measured = {(e["tp"], e["dp"]): e["median_s"] for e in json.loads(out.read_text())["layouts"]}
            cal = json.loads(cal_path.read_text())
            options = planner_pick(cal)
            predicted = {(p.tp, p.dp): p.step_s for p in options}
            summary = (f"measured {({k: round(v * 1e3, 1) for k, v in measured.items()})} ms, predicted "
                       f"{({k: round(v * 1e3, 1) for k, v in predicted.items()})} ms (tp, dp) at {RATE}")  # fmt: skip
            attempts.append(summary)
            if max(predicted.values()) / min(predicted.values()) >= DECISIVE:
                break
    print("\n".join(attempts))
    slower, faster = max(predicted.values()), min(predicted.values())
    assert slower / faster >= DECISIVE, f"the scenario is not decisive in {len(attempts)} attempts: {attempts}"
    pick = (options[0].tp, options[0].dp)
    best = min(measured, key=measured.get)
    assert pick == best, (
        f"planner picked tp={pick[0]}, dp={pick[1]}; measured best tp={best[0]}, dp={best[1]}: {summary}"
    )
    # the scenario can tell a model without communication: it would pick the other layout
    blind = planner_pick(without_comm(cal))[0]
    assert (blind.tp, blind.dp) != best, f"a model ignoring comm also picks tp={blind.tp}: {summary}"
