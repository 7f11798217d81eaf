"""GPT block forward+backward at tp 1, 2 and 4 on one box (4 gloo ranks, one thread each, on this machine's cores),
measured against the cost model predicting from a calibration taken in the same run.

    THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 python bench/block_scaling.py [--hidden 512 --heads 8 --seq 512]

What is fair here: 4 ranks always run at once, so every tp sees the same oversubscribed machine the calibration
measured (all ranks busy): tp=4 is one group of 4, tp=2 two groups of 2 side by side, tp=1 four dense blocks side
by side, each group on the same input. A row's time is one group's block step (max over all 4 ranks), so a
degree's time is what one block step costs when the whole machine trains. Degrees interleave round-robin (a
barrier before each step, max over ranks, median and p90 over rounds) so all see the same background load.
R measured: the profiler's collective time over the rest of the step, on extra profiled steps.

Writes bench/results/block-scaling-<date>.json (+ the calibration beside it, -calibration.json), read by
tests/planner/test_costmodel_recorded.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise
from shardwise.nn import ParallelTransformerBlock
from shardwise.planner import calibration

RESULTS = Path(__file__).resolve().parent / "results"
DEGREES = (1, 2, 4)
WORLD = 4


def tp_mesh(tp: int) -> shardwise.Mesh:
    """This rank's mesh for a tp-degree group of adjacent ranks (dp groups unused: no gradient sync here).
    new_group is collective: every rank creates every group in the same order."""
    rank = dist.get_rank()
    if tp == 1:
        return shardwise.Mesh.single()
    mine = None
    for first in range(0, WORLD, tp):
        group = dist.new_group(list(range(first, first + tp)))
        if first <= rank < first + tp:
            mine = group
    return shardwise.Mesh(tp_size=tp, tp_rank=rank % tp, dp_size=WORLD // tp, dp_rank=rank // tp, tp_group=mine)


def run(hidden: int, heads: int, seq: int, rounds: int, cal_quick: bool) -> dict | None:
    if not dist.is_initialized():  # the launcher's env (RANK, WORLD_SIZE, MASTER_*): our own groups below
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    cal = None
    try:
        from shardwise.planner.calibration import calibrate_here
    except ImportError:
        calibrate_here = None
    if calibrate_here is not None:
        cal = calibrate_here(None, quick=cal_quick)
    meshes = {tp: tp_mesh(tp) for tp in DEGREES}
    torch.manual_seed(0)
    blocks = {tp: ParallelTransformerBlock(hidden, heads, mesh=meshes[tp]) for tp in DEGREES}
    x = torch.randn(seq, 1, hidden)

    def step_of(block):
        def step():
            xin = x.clone().requires_grad_()
            y = block(xin)
            y.sum().backward()
            _ = float(y.detach()[0, 0, 0]) + float(xin.grad[0, 0, 0])  # read the results inside the step
            block.zero_grad(set_to_none=True)

        return step

    for tp in DEGREES:
        calibration.timed(step_of(blocks[tp]), 2)
    times = {tp: [] for tp in DEGREES}
    for _ in range(rounds):
        for tp in DEGREES:
            times[tp] += calibration.timed(step_of(blocks[tp]), 1)
    profiled = {}
    for tp in DEGREES:
        with shardwise.profile(blocks[tp]) as prof:
            for _ in range(4):
                prof.begin()
                step_of(blocks[tp])()
                prof.step()
        comm = torch.tensor([statistics.median(s["comm_ms"] for s in prof.steps[1:])], dtype=torch.float64)
        dist.all_reduce(comm, op=dist.ReduceOp.MAX)
        profiled[tp] = {"comm_ms": comm.item(), "layers": prof.layers(skip_steps=1)}
    if dist.get_rank() != 0:
        return None
    return {"times": times, "profiled": profiled, "calibration": cal}


def predictions(cal_path: Path, hidden: int, heads: int, seq: int) -> dict:
    """tp -> {"compute_s", "comm_s", "total_s", "R"} of one block fwd+bwd from the run's calibration alone."""
    from shardwise.costmodel import block_config, from_calibration, predict

    hw = from_calibration(str(cal_path))
    cfg = block_config(hidden, heads, seq, 1)
    out = {}
    for tp in DEGREES:
        p = predict(cfg, hw, tp, devices=WORLD)  # devices=4: the calibration's concurrency; dp is not timed here
        out[tp] = {"compute_s": p.compute_s, "comm_s": p.comm_s, "total_s": p.compute_s + p.comm_s, "R": p.R}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--full-calibration", action="store_true", help="calibrate_here(quick=False)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    load_before = os.getloadavg()
    result = shardwise.launch(run, WORLD, a.hidden, a.heads, a.seq, a.rounds, not a.full_calibration,
                              timeout_s=900)[0]  # fmt: skip
    load_after = os.getloadavg()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    cal_path = out / f"block-scaling-{date}-calibration.json"
    pred = {}
    if result["calibration"] is not None:
        cal_path.write_text(json.dumps(result["calibration"], indent=1))
        pred = predictions(cal_path, a.hidden, a.heads, a.seq)
    rows = []
    for tp in DEGREES:
        times = sorted(result["times"][tp])
        median = statistics.median(times)
        comm = result["profiled"][tp]["comm_ms"] / 1e3
        row = {"tp": tp, "measured_median_s": median, "measured_p90_s": times[int(0.9 * (len(times) - 1))],
               "measured_comm_s": comm, "R_measured": comm / max(median - comm, 1e-12),
               "layers": result["profiled"][tp]["layers"]}  # fmt: skip
        if tp in pred:
            p = pred[tp]
            row.update(predicted_s=p["total_s"], predicted_compute_s=p["compute_s"], predicted_comm_s=p["comm_s"],
                       R_predicted=p["R"], error=p["total_s"] / median - 1)  # fmt: skip
        rows.append(row)
    record = {
        "benchmark": "GPT block fwd+bwd at tp 1, 2, 4 on one box, 4 ranks busy, vs cost model v2",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "torch": torch.__version__, "threads_per_rank": 1, "backend": "gloo", "world": WORLD,
        "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after,
        "config": {"hidden": a.hidden, "heads": a.heads, "seq": a.seq, "batch": 1, "rounds": a.rounds},
        "calibration_file": cal_path.name if result["calibration"] is not None else None, "rows": rows,
    }  # fmt: skip
    path = out / f"block-scaling-{date}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'tp':>3} {'measured ms':>12} {'p90':>8} {'comm ms':>8} {'R':>6} {'predicted ms':>13} {'comm':>8} "
          f"{'R':>6} {'error':>7}")  # fmt: skip
    for r in rows:
        pred_cols = "  (no calibration v2: no prediction)"
        if "predicted_s" in r:
            pred_cols = (f"{r['predicted_s'] * 1e3:>13.1f} {r['predicted_comm_s'] * 1e3:>8.1f} "
                         f"{r['R_predicted']:>6.3f} {r['error']:>+7.1%}")  # fmt: skip
        print(f"{r['tp']:>3} {r['measured_median_s'] * 1e3:>12.1f} {r['measured_p90_s'] * 1e3:>8.1f} "
              f"{r['measured_comm_s'] * 1e3:>8.1f} {r['R_measured']:>6.3f} {pred_cols}")  # fmt: skip
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
