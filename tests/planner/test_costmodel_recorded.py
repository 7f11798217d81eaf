"""The cost model against the GPT block measured here (bench/scaling.py's recorded run, not re-timed).

The total alone cannot fail for a wrong communication model (comm is ~7% of the predicted tp=2 step, so scaling
it by 0.1x..5x kept the total within 20%); so compute, communication and R = comm / compute are each compared
with what was measured. Measured at tp=2: R_measured (the profiler's collective time over the rest of the step)
and the step's median, so measured comm = median * R / (1 + R) and measured compute = median / (1 + R).

Communication and R do NOT meet the tolerance with the v1 model (recorded run 2026-11-22: comm predicted 13.9 ms
from the alpha-beta fit, 18.5 ms from the calibration's own all-reduce point at the block's 2 MiB message, 31.4 ms
measured; R 0.076 predicted vs 0.158 measured): gloo under the block's load is ~2x slower than in isolation.
That comparison is a strict xfail until issue 11 rebuilds the model: it turns into a failure (XPASS) once the
model meets it, so the marker is removed then."""

import json
from pathlib import Path

import pytest
from shardwise.costmodel import block_config, measured_hardware, predict

RESULTS = sorted((Path(__file__).resolve().parents[2] / "bench" / "results").glob("scaling-*.json"))
recorded = pytest.mark.skipif(not RESULTS, reason="no recorded run: THP_MEM_ALLOC_ENABLE=1 python bench/scaling.py")
COMM_REL = 0.30  # comm and R within 30% of measured: a 2x (or 0.5x) error in the comm model cannot pass
COMPUTE_REL = 0.20


def _record() -> dict:
    return json.loads(RESULTS[-1].read_text())


def _predictions(record: dict, comm_scale: float = 1.0) -> dict:
    """tp -> (compute_s, comm_s, R) predicted from the run's calibration alone; comm_scale makes the mutant."""
    c = record["config"]
    cfg = block_config(c["hidden"], c["heads"], c["seq"], c["batch"])
    flops = {int(tp): v for tp, v in record["calibration"]["matmul_flops"].items()}
    out = {}
    for row in record["rows"]:
        p = predict(cfg, measured_hardware(record["calibration"]["fit"], flops[row["tp"]], 2), row["tp"])
        comm = comm_scale * p.comm_s
        out[row["tp"]] = (p.compute_s, comm, comm / p.compute_s)
    return out


def _measured(row: dict) -> tuple[float, float, float]:
    """(compute_s, comm_s, R) of a recorded row: the median step split by the profiler's R."""
    total, r = row["measured_median_s"], row["R_measured"]
    return total / (1 + r), total * r / (1 + r), r


def check_comm_and_R(predicted: tuple, measured: tuple, where: str) -> None:
    _, comm, r = predicted
    _, comm_m, r_m = measured
    assert comm == pytest.approx(comm_m, rel=COMM_REL), f"{where}: comm {comm * 1e3:.1f} ms vs {comm_m * 1e3:.1f}"
    assert r == pytest.approx(r_m, rel=COMM_REL), f"{where}: R {r:.3f} predicted vs {r_m:.3f} measured"


@recorded
def test_predicted_block_time_within_20_percent_of_measured():
    record = _record()
    pred = _predictions(record)
    for row in record["rows"]:
        compute, comm, _ = pred[row["tp"]]
        assert compute + comm == pytest.approx(row["measured_median_s"], rel=0.20), (row["tp"], compute + comm, row)


@recorded
def test_predicted_compute_within_20_percent_of_measured_rest():
    record = _record()
    pred = _predictions(record)
    for row in record["rows"]:
        assert pred[row["tp"]][0] == pytest.approx(_measured(row)[0], rel=COMPUTE_REL), (row["tp"], pred, row)


@recorded
@pytest.mark.xfail(strict=True, reason="v1 cost model: gloo comm under load ~2x the isolated calibration (issue 11)")
def test_predicted_comm_and_R_match_measured():
    record = _record()
    pred = _predictions(record)
    for row in record["rows"]:
        if row["tp"] > 1:
            check_comm_and_R(pred[row["tp"]], _measured(row), f"tp={row['tp']}")


@recorded
def test_recorded_prediction_is_what_the_model_computes():
    """The record's predicted comm and R are today's model on the record's calibration (no stale numbers)."""
    record = _record()
    pred = _predictions(record)
    for row in record["rows"]:
        assert pred[row["tp"]][1] == pytest.approx(row["predicted_comm_s"], rel=1e-9)
        assert pred[row["tp"]][2] == pytest.approx(row["R_predicted"], rel=1e-9)


@recorded
def test_the_comm_check_fails_a_2x_comm_model():
    """The tolerance can fail: a model whose comm equals the measured comm passes; one scaled by 2 or 0.5 does not.
    (Today's model scaled by 0.5 fails too; scaled by 2 it lands at 27.7 ms against 31.4 ms measured, within the
    tolerance, because it is itself 2.27x low: that is the strict xfail above turning into XPASS.)"""
    record = _record()
    row = next(r for r in record["rows"] if r["tp"] > 1)
    measured = _measured(row)
    compute = measured[0]
    exact = (compute, measured[1], measured[1] / compute)
    check_comm_and_R(exact, measured, "exact")
    for scale in (2.0, 0.5):
        wrong = (compute, scale * measured[1], scale * measured[1] / compute)
        with pytest.raises(AssertionError):
            check_comm_and_R(wrong, measured, f"x{scale}")
    with pytest.raises(AssertionError):
        check_comm_and_R(_predictions(record, comm_scale=0.5)[row["tp"]], measured, "model x0.5")
