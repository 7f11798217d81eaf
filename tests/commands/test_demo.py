"""`shardwise demo` end to end, as a newcomer runs it."""

import json
import os
import re
import subprocess
import sys

import pytest

OVERLAP = ["--overlap", "--sequence-parallel", "--chunks", "2", "--steps", "10"]


@pytest.mark.parametrize("extra", [[], ["--sequence-parallel", "--steps", "10"], OVERLAP])
def test_demo_runs_and_reports(tmp_path, extra):
    report = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "shardwise", "demo", "--steps", "20", "--no-progress", "--report", str(report)]
    out = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "R = comm/compute" in out.stdout
    data = json.loads(report.read_text())
    assert data["max_abs_diff_output"] < 1e-4
    layers = {row["layer"]: row for row in data["layers"]}
    h, tokens = 256, 64 * 4
    # the MLP's row-parallel layer all-reduces (or reduce-scatters) one [tokens, h] fp32 activation per step
    assert layers["mlp.down"]["bytes_per_step"] >= h * tokens * 4
    for row in data["layers"]:
        assert row["comm_ms_per_step"] >= 0 and row["compute_ms_per_step"] >= 0
        if row["bytes_per_step"] and row["compute_ms_per_step"]:
            assert row["R"] == pytest.approx(row["comm_ms_per_step"] / row["compute_ms_per_step"])
    assert len(data["steps"]) == (10 if extra else 20)
    assert all(s["comm_ms"] > 0 and s["loss"] > 0 for s in data["steps"])
    assert data["steps"][-1]["loss"] < data["steps"][0]["loss"]
    if "--overlap" in extra:  # both runs timed, side by side
        cmp = data["overlap_comparison"]
        assert cmp["overlap_on"]["step_ms"] > 0 and cmp["overlap_off"]["exposed_comm_ms"] > 0
        assert "exposed comm" in out.stdout


def test_demo_rejects_bad_flags(tmp_path):
    # fewer heads than ranks cannot be split: the parser says so before any rank starts
    out = subprocess.run([sys.executable, "-m", "shardwise", "demo", "--tp", "3", "--heads", "2"], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2 and "--heads 2 cannot be split over --tp 3: every rank needs a head" in out.stderr
    # but heads tp does not divide are accepted and split unevenly (8 over 3 ranks: 3, 3, 2), matching dense
    cmd = [sys.executable, "-m", "shardwise", "demo", "--tp", "3", "--steps", "2", "--hidden", "48", "--seq", "6",
           "--batch", "2", "--no-progress", "--report", str(tmp_path / "demo.json")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "demo.json").read_text())["max_abs_diff_output"] < 1e-4


def test_demo_narrates_each_collective(tmp_path):
    """--narrate: both ranks say when each collective starts and finishes, with op, bytes and ms waited."""
    cmd = [sys.executable, "-m", "shardwise", "demo", "--steps", "2", "--narrate", "--no-progress", "--hidden", "32",
           "--heads", "4", "--seq", "8", "--batch", "2", "--report", str(tmp_path / "demo.json")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    nbytes = 8 * 2 * 32 * 4  # one [s, b, h] fp32 activation
    for rank in (0, 1):
        start = f"[rank {rank}] mlp.down fwd all_reduce 2.0 KiB ({nbytes} bytes) over 2 ranks: started (blocking)"
        assert start in lines, out.stdout[-3000:]
        done = [ln for ln in lines if ln.startswith(f"[rank {rank}] mlp.down fwd all_reduce 2.0 KiB ({nbytes} bytes)")]
        assert len(done) == 2 and re.fullmatch(r".*: finished, waited \d+\.\d{3} ms", done[1]), done
        # only the first step is told: 3 forward and 2 backward all-reduces, each started and finished
        assert sum(ln.startswith(f"[rank {rank}] ") and " over 2 ranks: " in ln for ln in lines) == 2 * 5
