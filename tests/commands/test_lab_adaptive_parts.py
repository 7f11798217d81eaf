"""The parts of `shardwise lab adaptive` that need no lab: the step-driven rate schedule, the per-phase statistics
and the static pick from a recorded calibration (bench/results/adaptive-2026-11-22). The whole command runs in
bench/ADAPTIVE.md; tests/lab/test_adaptive_lab.py runs train --adaptive in a real lab in CI."""

import json
import statistics
from argparse import Namespace
from pathlib import Path

import pytest

from shardwise.commands.lab_adaptive import StepSchedule, _phase_stats, _static_pick

RUN = Path(__file__).resolve().parents[2] / "bench" / "results" / "adaptive-2026-11-22"


class FakeFabric:
    def __init__(self):
        self.rate, self.calls = "unshaped", []

    def set_rate(self, rate):
        self.rate = rate
        self.calls.append(rate)


def test_rates_change_when_the_step_log_reaches_each_phase(tmp_path):
    log, fab = tmp_path / "steps.jsonl", FakeFabric()
    schedule = StepSchedule(fab, log, [(4, "100mbit"), (8, "unshaped")])
    schedule(0.0)  # no log yet: nothing
    with open(log, "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step}) + "\n")
        f.write('{"step": 4')  # a line still being written is not read
        f.flush()
        schedule(0.1)
        assert fab.calls == []
        f.write("}\n")
        f.flush()
        schedule(0.2)
        assert fab.calls == ["100mbit"] and [a["after_step"] for a in schedule.applied] == [4]
        for step in range(5, 10):  # both thresholds passed in one read: applied in order, each once
            f.write(json.dumps({"step": step}) + "\n")
        f.flush()
        schedule(0.3)
        schedule(0.4)
    assert fab.calls == ["100mbit", "unshaped"]
    assert [a["rate"] for a in schedule.applied] == ["100mbit", "unshaped"]


def test_phase_statistics_are_medians_of_each_phase():
    steps = [{"step": s, "tokens": 256, "step_s": 0.1 * (1 + s % 3) if s <= 5 else 1.0} for s in range(1, 11)]
    stats = _phase_stats(steps, per_phase=5, phases=2)
    assert stats["peak"] == pytest.approx(256 / statistics.median(0.1 * (1 + s % 3) for s in range(1, 6)))
    assert stats["low"] == pytest.approx(256.0)


@pytest.mark.skipif(not (RUN / "calibration.json").is_file(), reason="no recorded lab calibration")
def test_static_pick_from_the_recorded_calibration_changes_with_the_rate():
    cal = json.loads((RUN / "calibration.json").read_text())
    args = Namespace(hidden=256, layers=2, heads=8, batch=4, seq=64)
    peak, predicted_peak = _static_pick(cal, args, 4, None)  # unshaped
    low, predicted_low = _static_pick(cal, args, 4, 100_000_000)
    assert (peak.name, low.name) == ("tp1dp4-tp-inner", "tp2dp2-dp-inner")
    assert predicted_low["tp1dp4-tp-inner"] > predicted_peak["tp1dp4-tp-inner"] * 2  # the dp ring crosses the link
