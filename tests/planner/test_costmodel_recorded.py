"""The cost model against runs recorded here (bench/results), not re-timed: the GPT block at tp 1, 2, 4 on one box
(bench/block_scaling.py) and every layout of the fabric-lab scenarios (bench/planner_lab.py), each predicted from
the calibration taken in the same run.

Totals alone cannot fail for a wrong communication model, so besides the step (within 15%) each transformer block's
communication time and R = comm / compute are compared with what was measured (within 25%): a 2x (or 0.5x) error
in communication cannot pass a row that passes today (test_a_2x_comm_model_fails checks exactly that, with comm
scaled on the prediction and with the model's collective time itself doubled).

Rows the model genuinely misses are strict xfails with the recorded numbers in the reason (KNOWN_MISSES): each turns
into a failure (XPASS) once the model meets it, and the entry is then removed. Re-recording the runs (the lead
re-runs the benchmarks on a quiet machine) means re-checking this list.
"""

import json
from pathlib import Path

import pytest
from shardwise.costmodel import from_calibration, predict

from shardwise.planner import hardware
from shardwise.planner.workload import block_config, gpt_config

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
BLOCK = sorted(RESULTS.glob("block-scaling-????-??-??.json"))
PLANNER = sorted(RESULTS.glob("planner-????-??-??.json"))
STEP_REL, COMM_REL = 0.15, 0.25

# fmt: off
KNOWN_MISSES: dict[str, str] = {  # block-scaling-2026-12-06.json, planner-2026-12-06.json
    'block-tp1':
        'step 273.2 ms predicted vs 333.7 ms measured (-18%)',
    'block-tp2':
        'block: comm 17.5 ms predicted vs 44.0 ms measured; block: R 0.12 predicted vs 0.31 measured',
    'block-tp4':
        'block: comm 23.4 ms predicted vs 55.5 ms measured; block: R 0.30 predicted vs 0.88 measured; step '
        '100.2 ms predicted vs 118.4 ms measured (-15%)',
    '2x1@unshaped-tp2dp1-tp-inner':
        'blocks.0: comm 17.9 ms predicted vs 35.5 ms measured; blocks.0: R 1.23 predicted vs 1.83 measured; '
        'blocks.1: comm 17.9 ms predicted vs 32.7 ms measured; blocks.1: R 1.23 predicted vs 1.70 measured; '
        'step 94.5 ms predicted vs 137.8 ms measured (-31%)',
    '2x1@unshaped-tp2dp1-tp-inner+sp':
        'blocks.0: comm 39.8 ms predicted vs 67.7 ms measured; blocks.1: comm 39.8 ms predicted vs 71.7 ms '
        'measured; blocks.1: R 2.41 predicted vs 3.33 measured; step 161.2 ms predicted vs 244.4 ms measured '
        '(-34%)',
    '2x1@1gbit-tp1dp2-tp-inner':
        'step 82.5 ms predicted vs 109.9 ms measured (-25%)',
    '2x1@1gbit-tp2dp1-tp-inner':
        'blocks.0: comm 40.3 ms predicted vs 31.3 ms measured; blocks.0: R 2.41 predicted vs 1.65 measured; '
        'blocks.1: comm 40.3 ms predicted vs 21.3 ms measured; blocks.1: R 2.41 predicted vs 1.19 measured',
    '2x1@1gbit-tp2dp1-tp-inner+sp':
        'blocks.0: comm 57.6 ms predicted vs 86.4 ms measured; blocks.1: comm 57.6 ms predicted vs 78.3 ms '
        'measured',
    '2x1@300mbit-tp2dp1-tp-inner':
        'blocks.0: comm 36.7 ms predicted vs 25.6 ms measured; blocks.0: R 2.42 predicted vs 1.30 measured; '
        'blocks.1: R 2.42 predicted vs 1.76 measured',
    '2x1@300mbit-tp2dp1-tp-inner+sp':
        'blocks.0: R 4.24 predicted vs 2.85 measured; blocks.1: R 4.24 predicted vs 2.75 measured',
    '2x1@100mbit-tp2dp1-tp-inner+sp':
        'step 301.3 ms predicted vs 366.7 ms measured (-18%)',
    '2x2@unshaped-tp1dp4-tp-inner':
        'step 56.1 ms predicted vs 82.9 ms measured (-32%)',
    '2x2@unshaped-tp2dp2-tp-inner':
        'blocks.0: comm 11.2 ms predicted vs 21.4 ms measured; blocks.0: R 0.73 predicted vs 2.10 measured; '
        'blocks.1: comm 11.2 ms predicted vs 24.7 ms measured; blocks.1: R 0.73 predicted vs 2.57 measured; '
        'step 80.4 ms predicted vs 103.4 ms measured (-22%)',
    '2x2@unshaped-tp2dp2-tp-inner+sp':
        'blocks.0: comm 26.5 ms predicted vs 43.0 ms measured; blocks.0: R 1.36 predicted vs 3.43 measured; '
        'blocks.1: comm 26.5 ms predicted vs 37.6 ms measured; blocks.1: R 1.36 predicted vs 3.40 measured; '
        'step 132.0 ms predicted vs 180.6 ms measured (-27%)',
    '2x2@unshaped-tp2dp2-dp-inner':
        'blocks.0: comm 11.7 ms predicted vs 25.7 ms measured; blocks.0: R 0.76 predicted vs 2.45 measured; '
        'blocks.1: comm 11.7 ms predicted vs 18.6 ms measured; blocks.1: R 0.76 predicted vs 1.82 measured; '
        'step 80.4 ms predicted vs 109.4 ms measured (-27%)',
    '2x2@unshaped-tp2dp2-dp-inner+sp':
        'blocks.0: comm 28.3 ms predicted vs 43.6 ms measured; blocks.0: R 1.45 predicted vs 3.55 measured; '
        'blocks.1: comm 28.3 ms predicted vs 43.6 ms measured; blocks.1: R 1.45 predicted vs 3.74 measured; '
        'step 135.5 ms predicted vs 188.9 ms measured (-28%)',
    '2x2@unshaped-tp4dp1-tp-inner+sp':
        'step 659.2 ms predicted vs 508.6 ms measured (+30%)',
    '2x2@1gbit-tp1dp4-tp-inner':
        'step 105.2 ms predicted vs 135.2 ms measured (-22%)',
    '2x2@1gbit-tp2dp2-tp-inner':
        'blocks.0: comm 13.3 ms predicted vs 31.1 ms measured; blocks.0: R 0.87 predicted vs 2.48 measured; '
        'blocks.1: comm 13.3 ms predicted vs 22.6 ms measured; blocks.1: R 0.87 predicted vs 1.99 measured; '
        'step 123.4 ms predicted vs 151.3 ms measured (-18%)',
    '2x2@1gbit-tp2dp2-tp-inner+sp':
        'blocks.0: comm 31.8 ms predicted vs 44.0 ms measured; blocks.0: R 1.64 predicted vs 3.13 measured; '
        'blocks.1: R 1.64 predicted vs 3.10 measured; step 178.4 ms predicted vs 236.1 ms measured (-24%)',
    '2x2@1gbit-tp2dp2-dp-inner':
        'blocks.0: comm 17.8 ms predicted vs 23.9 ms measured; blocks.0: R 1.16 predicted vs 2.19 measured; '
        'blocks.1: R 1.16 predicted vs 2.04 measured; step 99.5 ms predicted vs 123.6 ms measured (-19%)',
    '2x2@1gbit-tp2dp2-dp-inner+sp':
        'blocks.0: R 2.07 predicted vs 3.47 measured; blocks.1: R 2.07 predicted vs 3.91 measured',
    '2x2@1gbit-tp4dp1-tp-inner+sp':
        'blocks.0: comm 206.2 ms predicted vs 160.6 ms measured; blocks.1: comm 206.2 ms predicted vs 158.5 '
        'ms measured; step 654.9 ms predicted vs 569.1 ms measured (+15%)',
    '2x2@300mbit-tp2dp2-tp-inner':
        'blocks.0: comm 13.0 ms predicted vs 21.4 ms measured; blocks.0: R 1.00 predicted vs 1.68 measured; '
        'blocks.1: comm 13.0 ms predicted vs 22.2 ms measured; blocks.1: R 1.00 predicted vs 1.89 measured; '
        'step 213.6 ms predicted vs 318.8 ms measured (-33%)',
    '2x2@300mbit-tp2dp2-tp-inner+sp':
        'blocks.0: R 1.72 predicted vs 3.25 measured; blocks.1: comm 30.6 ms predicted vs 41.5 ms measured; '
        'blocks.1: R 1.72 predicted vs 3.46 measured; step 268.5 ms predicted vs 372.7 ms measured (-28%)',
    '2x2@300mbit-tp2dp2-dp-inner':
        'blocks.0: comm 43.0 ms predicted vs 19.1 ms measured; blocks.0: R 3.30 predicted vs 1.69 measured; '
        'blocks.1: comm 43.0 ms predicted vs 23.7 ms measured; blocks.1: R 3.30 predicted vs 2.40 measured; '
        'step 164.1 ms predicted vs 119.9 ms measured (+37%)',
    '2x2@300mbit-tp2dp2-dp-inner+sp':
        'blocks.0: comm 69.9 ms predicted vs 49.8 ms measured; blocks.1: comm 69.9 ms predicted vs 40.8 ms '
        'measured; step 251.3 ms predicted vs 174.0 ms measured (+44%)',
    '2x2@300mbit-tp4dp1-tp-inner':
        'step 312.2 ms predicted vs 251.1 ms measured (+24%)',
    '2x2@300mbit-tp4dp1-tp-inner+sp':
        'blocks.0: comm 204.9 ms predicted vs 160.4 ms measured; blocks.1: comm 204.9 ms predicted vs 159.7 '
        'ms measured; step 643.9 ms predicted vs 480.9 ms measured (+34%)',
    '2x2@100mbit-tp2dp2-tp-inner':
        'blocks.0: comm 14.9 ms predicted vs 24.3 ms measured; blocks.0: R 0.82 predicted vs 1.33 measured; '
        'blocks.1: comm 14.9 ms predicted vs 23.9 ms measured; blocks.1: R 0.82 predicted vs 1.36 measured',
    '2x2@100mbit-tp2dp2-tp-inner+sp':
        'blocks.0: comm 30.2 ms predicted vs 55.8 ms measured; blocks.0: R 1.10 predicted vs 2.59 measured; '
        'blocks.1: comm 30.2 ms predicted vs 56.8 ms measured; blocks.1: R 1.10 predicted vs 2.90 measured',
    '2x2@100mbit-tp2dp2-dp-inner':
        'blocks.0: comm 90.9 ms predicted vs 67.0 ms measured; blocks.1: comm 90.9 ms predicted vs 61.9 ms '
        'measured; blocks.1: R 4.97 predicted vs 3.41 measured; step 307.7 ms predicted vs 253.7 ms measured '
        '(+21%)',
    '2x2@100mbit-tp2dp2-dp-inner+sp':
        'blocks.0: comm 147.4 ms predicted vs 117.7 ms measured; blocks.1: comm 147.4 ms predicted vs 112.0 '
        'ms measured; step 486.4 ms predicted vs 368.3 ms measured (+32%)',
    '2x2@100mbit-tp4dp1-tp-inner':
        'blocks.0: R 4.96 predicted vs 3.39 measured; blocks.1: R 4.96 predicted vs 3.27 measured',
    '2x2@100mbit-tp4dp1-tp-inner+sp':
        'step 793.3 ms predicted vs 661.4 ms measured (+20%)',
}
# fmt: on


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def block_cases() -> list:
    if not BLOCK:
        return []
    rec = load(BLOCK[-1])
    return [("block", f"block-tp{row['tp']}", row["tp"]) for row in rec["rows"] if rec.get("calibration_file")]


def planner_cases() -> list:
    if not PLANNER:
        return []
    rec = load(PLANNER[-1])
    return [("planner", f"{sc['scenario']}@{rate}-{row['layout']}", (i, rate, j))
            for i, sc in enumerate(rec["scenarios"]) for rate, res in sc["rates"].items()
            for j, row in enumerate(res["rows"])]  # fmt: skip


def cases() -> list:
    out = []
    for kind, case_id, ref in block_cases() + planner_cases():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[case_id])] if case_id in KNOWN_MISSES else []
        out.append(pytest.param(kind, case_id, ref, id=case_id, marks=marks))
    return out or [pytest.param(None, None, None, marks=pytest.mark.skip(reason="no recorded run in bench/results: "
                                                                          "run bench/block_scaling.py"))]  # fmt: skip


def compare(kind: str, ref, comm_scale: float = 1.0) -> dict:
    """{"step": (pred, meas), "blocks": [(name, pred comm, meas comm, pred R, meas R)]} of one recorded row,
    predicted now from the run's own calibration; comm_scale scales the predicted communication (the mutant)."""
    if kind == "block":
        rec = load(BLOCK[-1])
        row = next(r for r in rec["rows"] if r["tp"] == ref)
        c = rec["config"]
        hw = from_calibration(str(BLOCK[-1].parent / rec["calibration_file"]))
        p = predict(block_config(c["hidden"], c["heads"], c["seq"], c["batch"]), hw, ref, devices=rec["world"])
        comm = comm_scale * p.comm_s
        blocks = [("block", comm, row["measured_comm_s"], comm / p.compute_s, row["R_measured"])] if ref > 1 else []
        return {"step": (p.compute_s + comm, row["measured_median_s"]), "blocks": blocks}
    rec = load(PLANNER[-1])
    i, rate, j = ref
    res = rec["scenarios"][i]["rates"][rate]
    row = res["rows"][j]
    w = rec["workload"]
    gpt = {"hidden": w["hidden"], "num_heads": w["heads"], "num_layers": w["layers"], "vocab_size": w["vocab"]}
    cfg = gpt_config(gpt, seq=w["seq"], micro_batch=w["micro_batch"], dtype_bytes=4)
    p = predict(cfg, from_calibration(res["calibration"]), row["tp"], devices=row["tp"] * row["dp"],
                sequence_parallel=row["sequence_parallel"], global_batch=w["global_batch"],
                placement=row["placement"], recompute="none", overlap=False, zero=False)  # fmt: skip
    layers = {x["name"]: x for x in p.layers}
    blocks, extra = [], 0.0
    for b in row["blocks"] if row["tp"] > 1 else []:
        q = layers[b["name"]]
        comm = q["comm_s"] * p.micro_steps  # the model's layers are per micro-batch, the measurement per step
        blocks.append((b["name"], comm_scale * comm, b["measured_comm_s"], comm_scale * q["R"], b["measured_R"]))
        extra += (comm_scale - 1) * comm
    return {"step": (p.step_s + extra, row["measured_s"]), "blocks": blocks}


def comm_misses(result: dict) -> list[str]:
    out = []
    for name, comm, comm_m, r, r_m in result["blocks"]:
        if abs(comm - comm_m) > COMM_REL * comm_m:
            out.append(f"{name}: comm {comm * 1e3:.1f} ms predicted vs {comm_m * 1e3:.1f} ms measured")
        if abs(r - r_m) > COMM_REL * r_m:
            out.append(f"{name}: R {r:.2f} predicted vs {r_m:.2f} measured")
    return out


def problems(kind: str, case_id: str, ref, comm_scale: float = 1.0) -> list[str]:
    result = compare(kind, ref, comm_scale)
    pred, meas = result["step"]
    out = comm_misses(result)
    if abs(pred - meas) > STEP_REL * meas:
        out.append(f"step {pred * 1e3:.1f} ms predicted vs {meas * 1e3:.1f} ms measured ({pred / meas - 1:+.0%})")
    return out


@pytest.mark.parametrize("kind,case_id,ref", cases())
def test_recorded_step_comm_and_R_match_the_model(kind, case_id, ref):
    found = problems(kind, case_id, ref)
    assert not found, f"{case_id}: " + "; ".join(found)


def test_a_2x_comm_model_fails(monkeypatch):
    """The per-block check cannot pass a 2x (or 0.5x) communication error: on every recorded tp > 1 row a
    prediction equal to the measurement passes and the same scaled by 2 or 0.5 fails; every row that passes
    today fails with the model's comm scaled by 2 or 0.5, and with Hardware.collective itself doubled."""
    rows = [(kind, case_id, ref) for kind, case_id, ref in block_cases() + planner_cases()
            if compare(kind, ref)["blocks"]]  # fmt: skip
    if not rows:
        pytest.skip("no recorded tp > 1 row in bench/results")
    for kind, case_id, ref in rows:
        measured = [(n, cm, cm, rm, rm) for n, _, cm, _, rm in compare(kind, ref)["blocks"]]
        assert not comm_misses({"blocks": measured}), case_id
        for scale in (2.0, 0.5):
            wrong = [(n, scale * cm, cm, scale * rm, rm) for n, cm, _, rm, _ in measured]
            assert comm_misses({"blocks": wrong}), f"{case_id}: a comm x{scale} passes the check"
    passing = [(kind, case_id, ref) for kind, case_id, ref in rows if not comm_misses(compare(kind, ref))]
    for kind, case_id, ref in passing:
        for scale in (2.0, 0.5):
            assert comm_misses(compare(kind, ref, comm_scale=scale)), f"{case_id}: model comm x{scale} still passes"
    collective = hardware.Hardware.collective
    monkeypatch.setattr(hardware.Hardware, "collective", lambda self, *a, **k: 2 * collective(self, *a, **k))
    still = [case_id for kind, case_id, ref in passing if not comm_misses(compare(kind, ref))]
    assert not passing or len(still) < len(passing), f"doubling Hardware.collective passes every passing row: {still}"


if __name__ == "__main__":  # print KNOWN_MISSES for the recorded runs (after re-recording them)
    import textwrap

    print(f"KNOWN_MISSES = {{  # {BLOCK[-1].name if BLOCK else '-'}, {PLANNER[-1].name if PLANNER else '-'}")
    for kind, case_id, ref in block_cases() + planner_cases():
        found = problems(kind, case_id, ref)
        if found:
            parts = textwrap.wrap("; ".join(found), 100, drop_whitespace=False)
            print(f"    {case_id!r}:\n        " + "\n        ".join(repr(x) for x in parts) + ",")
    print("}")
