"""The planner against measurement in the fabric lab: 2 nodes x 1 rank and 2 nodes x 2 ranks, several link rates,
every feasible layout of a small GPT measured (bench/lab_step.py under torchrun across the lab's nodes) and
predicted by the cost model from a calibration taken inside the same fabric at the same rate.

    sudo THP_MEM_ALLOC_ENABLE=1 python bench/planner_lab.py [--scenarios 2x1,2x2] [--rates unshaped,1gbit,100mbit]

Per scenario and rate: one torchrun job runs calibrate_here (quick) and then every layout (tp x dp x placement x
sequence parallelism) one after the other. Compared: predicted step within 15% of the measured median; per
transformer block, comm and R = comm / compute within 25% (measured: the profiler's collective time inside the
block, the block's forward+backward span minus that); the planner's first choice (the shortest predicted step
among these layouts, plan()'s rule) is the measured best or within 5% of it. Crossover: where the measured best
changes between two rates, both leading layouts are re-measured on a denser sweep of rates between them (log
interpolation of their step ratio gives the measured crossover); the predicted crossover comes from the same model
with the calibration's inter-node link slowed or sped up in proportion to the rate (bisection in log rate).
Writes bench/results/planner-<date>.json, bench/results/planner-pred-vs-meas.png and bench/PLANNER.md's tables
(bench/planner_report.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEP_REL, COMM_REL, PICK_REL, CROSS_FACTOR = 0.15, 0.25, 0.05, 1.5
PROFILE_STEPS = 6  # profiled steps per layout for the block rows (3 until stop 19: noisy, see PLANNER.md)
SCENARIOS = {"2x1": (2, 1), "2x2": (2, 2)}
WORKLOAD = {"hidden": 256, "layers": 2, "heads": 8, "vocab": 512, "seq": 64, "global_batch": 4, "micro_batch": 1}


def feasible_layouts(world: int, heads: int, seq: int) -> list[dict]:
    """Every (tp, dp, placement, sp): tp dividing the world and the heads; both placements when tp and dp > 1;
    sequence parallelism when tp > 1 and tp divides seq."""
    out = []
    for tp in (t for t in range(1, world + 1) if world % t == 0 and heads % t == 0):
        dp = world // tp
        for placement in ("tp-inner", "dp-inner") if tp > 1 and dp > 1 else ("tp-inner",):
            for sp in (False, True) if tp > 1 and seq % tp == 0 else (False,):
                out.append({"tp": tp, "dp": dp, "placement": placement, "sequence_parallel": sp})
    return out


def key(layout: dict) -> str:
    return f"tp{layout['tp']}dp{layout['dp']}-{layout['placement']}{'+sp' if layout['sequence_parallel'] else ''}"


def bits(rate: str | None) -> float:
    """'100mbit' -> 1e8 bit/s; None (unshaped) -> inf."""
    if rate is None:
        return math.inf
    from shardwise.lab import parse_rate

    return float(parse_rate(rate))


def run_job(fab, ppn: int, layouts: list[dict], work: dict, steps: int, cal_path: str | None, tmp: Path,
            timeout_s: float, cal_mode: str = "medium") -> dict:  # fmt: skip
    out = tmp / f"step-{time.monotonic_ns()}.json"
    argv = [sys.executable, str(HERE / "lab_step.py"), "--out", str(out), "--steps", str(steps), "--warmup", "2",
            "--profile-steps", str(PROFILE_STEPS), "--timeout-s", str(timeout_s - 10)]  # fmt: skip
    for k, v in work.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    for lay in layouts:
        argv += ["--layout", f"{lay['tp']}:{lay['dp']}:{lay['placement']}:{int(lay['sequence_parallel'])}"]
    if cal_path:
        argv += ["--calibrate", cal_path, "--calibration-mode", cal_mode]
    res = fab.torchrun(argv, procs_per_node=ppn, env={"THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "1"},
                       timeout_s=timeout_s)  # fmt: skip
    if not res.ok:
        tails = "\n".join(f"[node {i}] ...{log[-1500:]}" for i, log in enumerate(res.logs))
        raise RuntimeError(f"lab job failed (returncodes {res.returncodes}):\n{tails}")
    return json.loads(out.read_text())


def model_config(work: dict):
    from shardwise.planner.workload import gpt_config

    gpt = {"hidden": work["hidden"], "num_heads": work["heads"], "num_layers": work["layers"],
           "vocab_size": work["vocab"]}  # fmt: skip
    return gpt_config(gpt, seq=work["seq"], micro_batch=work["micro_batch"], dtype_bytes=4)


def predict_layout(cal: dict, work: dict, layout: dict):
    """The cost model's predict for one measured layout from a calibration dict."""
    from shardwise.costmodel import from_calibration, predict

    hw = from_calibration(cal)
    return predict(model_config(work), hw, layout["tp"], devices=layout["tp"] * layout["dp"],
                   sequence_parallel=layout["sequence_parallel"], global_batch=work["global_batch"],
                   placement=layout["placement"], recompute="none", overlap=False, zero=False)  # fmt: skip


def scaled_links(cal: dict, factor: float, classes=("inter",)) -> dict:
    """A copy of the calibration with the collective fits of the link `classes` (None: all) `factor` times slower:
    beta multiplied (and alpha too when classes is None); the crossover's rate scaling keeps alpha."""
    cal = copy.deepcopy(cal)
    for klass, ops in cal.get("collectives", {}).items():
        if classes is not None and klass not in classes:
            continue
        for sizes in ops.values():
            for fit in sizes.values():
                for name in ("beta_s_per_byte",) + (("alpha_s",) if classes is None else ()):
                    if name in fit:
                        fit[name] *= factor
                if "transfer_fit" in fit and isinstance(fit["transfer_fit"], dict):
                    fit["transfer_fit"]["beta_s_per_byte"] *= factor
    return cal


def measured_blocks(entry: dict) -> list[dict]:
    """Per transformer block, mean over ranks: comm (profiler collectives inside it), compute (its fwd+bwd span
    minus that), R."""
    ranks = entry["profile"]["ranks"]
    names = sorted(ranks[0]["block_wall_s"], key=lambda n: int(n.split(".")[1]))
    out = []
    for name in names:
        comm = [sum(r["comm_ms_per_step"] for r in rk["layers"] if r["layer"].startswith(name + ".")) / 1e3
                for rk in ranks]  # fmt: skip
        wall = [rk["block_wall_s"][name] for rk in ranks]
        c, w = sum(comm) / len(comm), sum(wall) / len(wall)
        out.append({"name": name, "comm_s": c, "compute_s": max(w - c, 1e-9), "R": c / max(w - c, 1e-9)})
    return out


def profiled_steps(measured: dict) -> dict:
    """layout -> rank 0's median step under the profiler (its hooks' cost: compare with the timed median)."""
    out = {}
    for entry in measured["layouts"]:
        walls = sorted(s["wall_ms"] / 1e3 for s in entry["profile"]["steps"])
        out[key(entry)] = walls[len(walls) // 2] if walls else None
    return out


def dp_sync_s(entry: dict) -> float:
    ranks = entry["profile"]["ranks"]
    vals = [sum(r["comm_ms_per_step"] for r in rk["layers"] if r["layer"] == "dp_grad_sync") / 1e3 for rk in ranks]
    return max(vals)


def compare(cal: dict, work: dict, measured: dict) -> dict:
    """Rows predicted vs measured for one (scenario, rate), the planner's pick and the checks."""
    rows = []
    for entry in measured["layouts"]:
        rows.append({"layout": key(entry), "tp": entry["tp"], "dp": entry["dp"], "placement": entry["placement"],
                     "sequence_parallel": entry["sequence_parallel"], "measured_s": entry["median_s"],
                     "measured_p90_s": entry["p90_s"], "measured_dp_sync_s": dp_sync_s(entry),
                     "blocks": [{"name": m["name"], "measured_comm_s": m["comm_s"],
                                 "measured_compute_s": m["compute_s"], "measured_R": m["R"]}
                                for m in measured_blocks(entry)]})  # fmt: skip
    return {**predict_rows(cal, work, rows), "profiled_step_s": profiled_steps(measured)}


def predict_rows(cal: dict, work: dict, rows: list[dict]) -> dict:
    """Fill each measured row's predictions from `cal` (per block: per step, i.e. the model's per-micro-batch
    numbers times its micro-batches), the checks, and the planner's pick among these layouts."""
    for row in rows:
        p = predict_layout(cal, work, row)
        row.update(predicted_s=p.step_s, error=p.step_s / row["measured_s"] - 1, predicted_dp_comm_s=p.dp_comm_s,
                   predicted_dp_exposed_s=p.dp_exposed_s, tp_link=p.tp_link, dp_link=p.dp_link,
                   breakdown=p.breakdown, micro_steps=p.micro_steps)  # fmt: skip
        pred_layers = {x["name"]: x for x in p.layers}
        for b in row["blocks"]:
            q = pred_layers[b["name"]]
            b.update(predicted_comm_s=q["comm_s"] * p.micro_steps, predicted_compute_s=q["compute_s"] * p.micro_steps,
                     predicted_R=q["R"])  # fmt: skip
        row["step_ok"] = abs(row["error"]) <= STEP_REL
        row["comm_ok"] = all(within(b["predicted_comm_s"], b["measured_comm_s"], COMM_REL) and
                             within(b["predicted_R"], b["measured_R"], COMM_REL)
                             for b in row["blocks"]) if row["tp"] > 1 else None  # fmt: skip
    best = min(rows, key=lambda r: r["measured_s"])
    pick = min(rows, key=lambda r: r["predicted_s"])
    return {"rows": rows, "measured_best": best["layout"], "planner_pick": pick["layout"],
            "pick_vs_best": pick["measured_s"] / best["measured_s"] - 1,
            "pick_ok": pick["measured_s"] <= (1 + PICK_REL) * best["measured_s"]}  # fmt: skip


def repredict(record: dict) -> dict:
    """The record's predictions (rows, picks, predicted crossovers) redone with today's model from its stored
    calibrations, measurements untouched: `--repredict FILE` after a cost-model change."""
    from shardwise.planner.hardware import tail_beta_ratio

    work = record["workload"]
    for sc in record["scenarios"]:
        for res in sc["rates"].values():
            for ops in res["calibration"].get("collectives", {}).values():  # derived from the points: today's rule
                for fit in (f for sizes in ops.values() for f in sizes.values() if f.get("residuals")):
                    fit["tail_beta_ratio"] = tail_beta_ratio(fit)
            res.update(predict_rows(res["calibration"], work, res["rows"]))
        cx = sc.get("crossover", {})
        if cx.get("changes"):
            rows = {r["layout"]: r for r in next(iter(sc["rates"].values()))["rows"]}
            a, b = rows[cx["layouts"][0]], rows[cx["layouts"][1]]
            rate = cx["predicted_from_calibration_at"]
            cx["predicted_bits"] = predicted_crossover(sc["rates"][rate]["calibration"], rate, work, a, b, 20e6, 5e9)
            cx["ok"] = crossover_ok(cx["measured_bits"], cx["predicted_bits"])
    return record


def crossover_ok(measured: float | None, predicted: float | None) -> bool:
    return measured is not None and predicted is not None and 1 / CROSS_FACTOR <= predicted / measured <= CROSS_FACTOR


def within(pred: float, meas: float, rel: float) -> bool:
    return abs(pred - meas) <= rel * abs(meas)


def predicted_crossover(cal: dict, cal_rate: str, work: dict, a: dict, b: dict, lo: float, hi: float) -> float | None:
    """The rate (bit/s) in [lo, hi] where the predicted steps of layouts a and b cross (bisection in log rate),
    the calibration's inter-node fits scaled by cal_rate / rate; None if they do not cross there."""

    def diff(rate_bits: float) -> float:
        c = scaled_links(cal, bits(cal_rate) / rate_bits)
        return math.log(predict_layout(c, work, a).step_s / predict_layout(c, work, b).step_s)

    d_lo, d_hi = diff(lo), diff(hi)
    if d_lo * d_hi > 0:
        return None
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if diff(mid) * d_lo > 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def measured_crossover(points: list[tuple[float, float]]) -> float | None:
    """points [(rate bit/s, log(step_a / step_b))] -> the rate where the log ratio crosses 0 (log-rate linear)."""
    points = sorted(points)
    for (r0, d0), (r1, d1) in zip(points, points[1:], strict=False):
        if d0 == 0:
            return r0
        if d0 * d1 < 0:
            t = d0 / (d0 - d1)
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return None


def scenario(name: str, rates: list[str | None], work: dict, steps: int, sweep: int, tmp: Path,
             cal_mode: str) -> dict:  # fmt: skip
    from shardwise.lab import Fabric

    nodes, ppn = SCENARIOS[name]
    layouts = feasible_layouts(nodes * ppn, work["heads"], work["seq"])
    out = {"scenario": name, "nodes": nodes, "procs_per_node": ppn, "rates": {}}
    cals = {}
    with Fabric(nodes=nodes, rate=rates[0]) as fab:
        for rate in rates:
            fab.set_rate(rate)
            cal_path = str(tmp / f"cal-{name}-{rate}.json")
            started = time.monotonic()
            measured = run_job(fab, ppn, layouts, work, steps, cal_path, tmp, timeout_s=600, cal_mode=cal_mode)
            cal = json.loads(Path(cal_path).read_text())
            cals[rate] = cal
            res = compare(cal, work, measured)
            res.update(rate=rate or "unshaped", wall_s=time.monotonic() - started, calibration=cal)
            out["rates"][rate or "unshaped"] = res
            print(f"[{name} @ {rate or 'unshaped'}] measured best {res['measured_best']}, planner {res['planner_pick']}"
                  f" ({res['pick_vs_best']:+.1%}); " + ", ".join(f"{r['layout']} {r['measured_s'] * 1e3:.0f}/"
                  f"{r['predicted_s'] * 1e3:.0f} ms" for r in res["rows"]), flush=True)  # fmt: skip
        out["crossover"] = crossover(fab, name, ppn, rates, cals, out["rates"], work, steps, sweep, tmp)
    return out


def crossover(fab, name, ppn, rates, cals, results, work, steps, sweep, tmp) -> dict:
    """Where the measured best changes between neighbouring rates: a denser sweep of the two leaders there."""
    order = sorted(rates, key=bits)
    for lo_rate, hi_rate in zip(order, order[1:], strict=False):
        lo_best = results[lo_rate or "unshaped"]["measured_best"]
        hi_best = results[hi_rate or "unshaped"]["measured_best"]
        if lo_best != hi_best:
            break
    else:
        return {"changes": False, "note": f"the measured best is the same at every rate ({order})"}
    rows = {r["layout"]: r for r in results[lo_rate or "unshaped"]["rows"]}
    a, b = rows[lo_best], rows[hi_best]
    shaped = [r for r in (lo_rate, hi_rate) if r is not None]
    lo_b = bits(lo_rate)
    hi_b = bits(hi_rate) if hi_rate is not None else 20 * lo_b  # unshaped: sweep up to 20x the slower rate
    sweep_rates = [lo_b * (hi_b / lo_b) ** (i / (sweep + 1)) for i in range(1, sweep + 1)]
    points = []
    for rate_bits, label in [(lo_b, lo_rate)] + [(r, None) for r in sweep_rates] + [(hi_b, hi_rate)]:
        if label is not None or rate_bits == lo_b:
            res = results[label or "unshaped"]
            meas = {r["layout"]: r["measured_s"] for r in res["rows"]}
        else:
            fab.set_rate(f"{int(rate_bits / 1e3)}kbit")
            job = run_job(fab, ppn, [a, b], work, steps, None, tmp, timeout_s=300)
            meas = {key(e): e["median_s"] for e in job["layouts"]}
        points.append((rate_bits, math.log(meas[key(a)] / meas[key(b)])))
    measured = measured_crossover(points)
    cal_rate = shaped[-1]
    predicted = predicted_crossover(cals[cal_rate], cal_rate, work, a, b, 20e6, 5e9)
    ok = crossover_ok(measured, predicted)
    return {"changes": True, "layouts": [key(a), key(b)], "between": [lo_rate, hi_rate or "unshaped"],
            "sweep": [{"rate_bits": r, "log_ratio": d} for r, d in points], "measured_bits": measured,
            "predicted_bits": predicted, "predicted_from_calibration_at": cal_rate, "ok": ok}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="2x1,2x2")
    ap.add_argument("--rates", default="unshaped,1gbit,300mbit,100mbit", help="comma-separated tc rates; 'unshaped'")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sweep", type=int, default=2, help="extra rates between the two where the best changes")
    for k, v in WORKLOAD.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument(
        "--calibration",
        choices=("quick", "medium", "full"),
        default="medium",
        help="calibrate_here in each job: quick (noisy), medium (messages up to 8 MiB), full",
    )
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--repredict", default=None, help="a planner-<date>.json: redo its predictions and the report")
    a = ap.parse_args(argv)
    if a.repredict:
        src = Path(a.repredict)
        record = repredict(json.loads(src.read_text()))
        src.write_text(json.dumps(record, indent=1))
        from planner_report import write_report

        write_report(record, src.parent / "planner-pred-vs-meas.png", HERE / "PLANNER.md", f"bench/results/{src.name}")
        return 0
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    work = {k: getattr(a, k) for k in WORKLOAD}
    rates = [None if r == "unshaped" else r for r in a.rates.split(",")]
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "workload": work, "steps": a.steps,
              "tolerances": {"step": STEP_REL, "comm_and_R": COMM_REL, "pick": PICK_REL, "crossover": CROSS_FACTOR},
              "calibration_mode": a.calibration, "load_before": os.getloadavg(), "cores": os.cpu_count(),
              "profile_steps": PROFILE_STEPS,
              "scenarios": []}  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="planner-lab-") as tmp:
        for name in a.scenarios.split(","):
            record["scenarios"].append(scenario(name, rates, work, a.steps, a.sweep, Path(tmp), a.calibration))
    record.update(load_after=os.getloadavg(), wall_s=time.monotonic() - started)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"planner-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1))
    from planner_report import write_report

    md = HERE / "PLANNER.md" if out.resolve() == RESULTS else out / "PLANNER.md"  # a trial run leaves it alone
    write_report(record, out / "planner-pred-vs-meas.png", md, f"bench/results/{path.name}")
    print(f"written {path} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
