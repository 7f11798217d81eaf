"""The re-planner on a RECORDED run: `shardwise lab adaptive`'s adaptive run (bench/results/adaptive-2026-11-22,
2 nodes x 2 ranks, link unshaped -> 100 Mbit/s -> unshaped). Its log holds everything each decision saw (the
agreed step times and link estimates) and what the Replanner was built from; replayed into a fresh Replanner the
decisions must come out the same, switch for switch and reason for reason. Mutants it catches: any change to the
decision rules (patience, margin, horizon, cool-down, switch-back, the re-try on measurement) that changes what
the recorded run would have done; a cost model whose predictions moved."""

import json
from pathlib import Path

import pytest

from shardwise.adaptive import LinkEstimate, Replanner
from shardwise.live_reshard import Layout
from shardwise.planner.profiles import from_calibration
from shardwise.planner.workload import gpt_config

RUN = Path(__file__).resolve().parents[2] / "bench" / "results" / "adaptive-2026-11-22"


def replay(records: list[dict], hw, **override):
    start = records[0]
    assert start["kind"] == "start"
    candidates = [Layout.parse(name) for name in start["candidates"]]
    first = Layout.parse(start["layout"])
    cfg = gpt_config(start["model"], start["seq"], start["global_batch"] // first.dp)
    kwargs = {"every": start["every"], "bucket_mb": start["bucket_mb"], "horizon_steps": start["horizon"],
              "margin": start["margin"], **override}  # fmt: skip
    rp = Replanner(cfg, hw, first.tp * first.dp, candidates, start["global_batch"], **kwargs)
    out = []
    for record in records[1:]:
        if record["kind"] == "switch":
            rp.record_switch(record["seconds"])
            continue
        layout = Layout.parse(record["current"])
        estimates = {k: LinkEstimate.from_dict(v) for k, v in record["estimates"].items()}
        times = record["step_times"]
        for step, t in zip(range(record["step"] - len(times) + 1, record["step"] + 1), times, strict=True):
            decision = rp.decide(step, layout, estimates, t)
        out.append((decision.step, decision.switch_to, decision.reason))
    return out


@pytest.mark.skipif(not (RUN / "adaptive" / "adaptive.jsonl").is_file(), reason="no recorded adaptive run")
def test_recorded_adaptive_run_replays_to_the_same_decisions():
    records = [json.loads(line) for line in (RUN / "adaptive" / "adaptive.jsonl").read_text().splitlines()]
    hw = from_calibration(json.loads((RUN / "calibration.json").read_text()))
    recorded = [(r["step"], r["switch_to"], r["reason"]) for r in records if r["kind"] == "decision"]
    switches = [r for r in recorded if r[1]]
    assert len(switches) >= 2, "the recorded run switched down and back up"
    assert replay(records, hw) == recorded
    # the same trace with no patience and no margin decides differently: the replay is a real check of the rules
    assert replay(records, hw, patience=1, margin=0.0) != recorded
