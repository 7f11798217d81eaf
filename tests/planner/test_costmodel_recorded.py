"""The cost model against the GPT block measured here (bench/scaling.py's recorded run, not re-timed):
predicted forward+backward time within 20% of the measured median at tp 1 and 2."""

import json
from pathlib import Path

import pytest
from shardwise.costmodel import block_config, measured_hardware, predict

RESULTS = sorted((Path(__file__).resolve().parents[2] / "bench" / "results").glob("scaling-*.json"))


@pytest.mark.skipif(not RESULTS, reason="no recorded run: THP_MEM_ALLOC_ENABLE=1 python bench/scaling.py")
def test_predicted_block_time_within_20_percent_of_measured():
    record = json.loads(RESULTS[-1].read_text())
    c = record["config"]
    cfg = block_config(c["hidden"], c["heads"], c["seq"], c["batch"])
    flops = {int(tp): v for tp, v in record["calibration"]["matmul_flops"].items()}
    for row in record["rows"]:
        tp = row["tp"]
        p = predict(cfg, measured_hardware(record["calibration"]["fit"], flops[tp], 2), tp)
        predicted = p.compute_s + p.comm_s
        assert predicted == pytest.approx(row["measured_median_s"], rel=0.20), (tp, predicted, row)
