"""How reproducible a calibration is: N calibrations back to back in ONE lab job (same link, same ranks), and the
planner's predicted steps from each, so their spread is the calibration's own (not the steps').

    python bench/calibration_spread.py --rate 1gbit --runs 5        # as root: builds a 2-node lab, ~30 s a run

Writes bench/results/calibration-spread-<rate>-<date>.json: per run the predicted step (ms) of the lab's 2x1
layouts (tp2dp1, tp1dp2, tp2dp1+sp) and the calibrated pieces that moved most (the 64 KiB all-reduce's mean
call, the post-collective penalty, the rank-skew share), then each one's coefficient of variation and range.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = {"tp2dp1": (2, 1, False), "tp1dp2": (1, 2, False), "tp2dp1+sp": (2, 1, True)}


def worker(out: str, runs: int) -> None:
    """Inside the lab's torchrun: `runs` medium calibrations (as planner_lab's jobs take), rank 0 writes each."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from lab_step import calibrate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for i in range(runs):
        calibrate(str(Path(out, f"cal-{i}.json")), "medium")
    dist.barrier()
    dist.destroy_process_group()


def summarize(cals: list[dict]) -> dict:
    sys.path.insert(0, str(HERE))
    from planner_lab import WORKLOAD, predict_layout

    runs = []
    for cal in cals:
        row = {name: 1e3 * predict_layout(cal, WORKLOAD, {"tp": tp, "dp": dp, "placement": "tp-inner",
                                                           "sequence_parallel": sp}).step_s
               for name, (tp, dp, sp) in LAYOUTS.items()}  # fmt: skip
        points = dict(map(tuple, cal["collectives"]["inter"]["all_reduce"]["2"]["points"]))
        row.update(all_reduce_64k_ms=1e3 * points[65536], post_collective_ms=1e3 * cal["post_collective_s"],
                   skew_share=cal["rank_skew"]["wait_per_compute_s"])  # fmt: skip
        runs.append(row)
    spread = {k: {"mean": statistics.mean(v), "cv": statistics.pstdev(v) / statistics.mean(v), "min": min(v),
                  "max": max(v)} for k in runs[0] for v in [[r[k] for r in runs]]}  # fmt: skip
    return {"runs": runs, "spread": spread}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.runs)
        return 0
    from shardwise.lab.fabric import Fabric

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cal-spread-") as tmp:
        with Fabric(nodes=2, rate=a.rate) as fab:
            res = fab.torchrun([sys.executable, __file__, "--worker", tmp, "--runs", str(a.runs)], procs_per_node=1,
                               env={"THP_MEM_ALLOC_ENABLE": "1", "OMP_NUM_THREADS": "1"}, timeout_s=120 * a.runs)
            if not res.ok:
                raise SystemExit(f"lab job failed: {res.returncodes}")
        cals = [json.loads(Path(tmp, f"cal-{i}.json").read_text()) for i in range(a.runs)]
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "rate": a.rate, "nodes": 2,
              "procs_per_node": 1, "load_before": load_before, "load_after": os.getloadavg(), **summarize(cals)}
    path = HERE / "results" / f"calibration-spread-{a.rate}-{datetime.date.today()}.json"
    path.write_text(json.dumps(record, indent=1))
    for k, s in record["spread"].items():
        print(f"{k:20} mean {s['mean']:9.3f}  cv {s['cv']:.2f}  range {s['min']:.3f}-{s['max']:.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
