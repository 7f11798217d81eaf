"""`shardwise bench`: one GPT block, forward + backward, at tp=1 and tp=2, measured against the cost model.

In one run on 2 gloo ranks (one thread each): calibrate the fabric (alpha-beta fit of all-reduce
around the block's message size) and the matmul FLOP/s at the block's shapes, then time the block at
tp=2 (both ranks) and tp=1 (each rank its own dense block), steps interleaved round-robin, max over
ranks per step, median over steps. The cost model then predicts both from the calibration alone.
Writes scaling-<date>.json and an R(m) PNG (bench/scaling.py keeps them under bench/results, where
tests/test_costmodel_recorded.py reads them).
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

import shardwise

from ..nn import ParallelTransformerBlock
from ..planner import calibration
from ..planner.costmodel import block_config, measured_hardware, predict
from . import plots


def run(hidden: int, heads: int, seq: int, batch: int, steps: int) -> dict | None:
    mesh = shardwise.init_mesh(2)
    single = shardwise.Mesh.single()
    act_bytes = seq * batch * hidden * 4

    # calibration: all-reduce from 4 KiB to 4x the block's message, matmul at the block's shapes
    points = []
    for nbytes in sorted({4096, 65536, act_bytes // 4, act_bytes, 4 * act_bytes}):
        op, _ = calibration.collective("all_reduce", nbytes, mesh)
        op()
        points.append((nbytes, calibration.median_time(op, 9)))
    fit = calibration.fit(points)
    flops = {tp: calibration.matmul_flops(hidden, seq * batch, tp) for tp in (1, 2)}

    torch.manual_seed(0)
    blocks = {2: ParallelTransformerBlock(hidden, heads, mesh=mesh), 1: ParallelTransformerBlock(hidden, heads,
                                                                                             mesh=single)}  # fmt: skip
    x = torch.randn(seq, batch, hidden)

    def step_of(block):
        def step():
            xin = x.clone().requires_grad_()
            y = block(xin)
            y.sum().backward()
            _ = float(y.detach()[0, 0, 0]) + float(xin.grad[0, 0, 0])  # read the results inside the timed step
            block.zero_grad(set_to_none=True)

        return step

    for tp in (1, 2):  # warm-up
        calibration.timed(step_of(blocks[tp]), 3)
    times = {1: [], 2: []}
    for _ in range(steps):  # round-robin: both see the same machine state
        for tp in (1, 2):
            times[tp] += calibration.timed(step_of(blocks[tp]), 1)
    # R measured: collective time over the rest, from the profiler, on a few more tp=2 steps
    with shardwise.profile(blocks[2]) as prof:
        for _ in range(5):
            prof.begin()
            step_of(blocks[2])()
            prof.step()
    comm = statistics.median(s["comm_ms"] for s in prof.steps)
    rest = statistics.median(s["wall_ms"] - s["comm_ms"] for s in prof.steps)
    if mesh.tp_rank != 0:
        return None
    return {"fit": fit, "points": points, "matmul_flops": flops, "times": times, "act_bytes": act_bytes,
            "R_measured": comm / rest}  # fmt: skip


def predict_block(result: dict, hidden: int, heads: int, seq: int, batch: int) -> dict:
    """Predicted forward+backward time of one block at tp 1 and 2 from the run's calibration alone."""
    cfg = block_config(hidden, heads, seq, batch)
    flops = {int(tp): v for tp, v in result["matmul_flops"].items()}  # JSON turns the keys into strings
    out = {}
    for tp in (1, 2):
        p = predict(cfg, measured_hardware(result["fit"], flops[tp], 2), tp)
        out[tp] = {"compute_s": p.compute_s, "comm_s": p.comm_s, "total_s": p.compute_s + p.comm_s, "R": p.R}
    return out


def main(hidden: int = 1024, heads: int = 16, seq: int = 512, batch: int = 1, steps: int = 20,
         out_dir: str = ".") -> dict:  # fmt: skip
    result = shardwise.launch(run, 2, hidden, heads, seq, batch, steps)[0]
    pred = predict_block(result, hidden, heads, seq, batch)
    rows = []
    for tp in (1, 2):
        times = result["times"][tp]
        median = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        rows.append({"tp": tp, "measured_median_s": median, "measured_p90_s": p90, "predicted_s": pred[tp]["total_s"],
                     "predicted_compute_s": pred[tp]["compute_s"], "predicted_comm_s": pred[tp]["comm_s"],
                     "error": pred[tp]["total_s"] / median - 1, "R_predicted": pred[tp]["R"],
                     "R_measured": result["R_measured"] if tp > 1 else 0.0})  # fmt: skip
    record = {
        "benchmark": "GPT block fwd+bwd vs cost model", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "torch": torch.__version__, "threads_per_rank": 1, "backend": "gloo",
        "config": {"hidden": hidden, "heads": heads, "seq": seq, "batch": batch, "steps": steps},
        "calibration": {"fit": result["fit"], "points": result["points"], "matmul_flops": result["matmul_flops"]},
        "rows": rows,
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"scaling-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1))
    png = plots.ratio_vs_tp_chart(rows, str(out / "scaling-R.png"), f"GPT block h={hidden}, {seq * batch} tokens")
    print(f"{'tp':>3} {'measured ms':>12} {'p90 ms':>8} {'predicted ms':>13} {'(compute+comm)':>16} {'error':>7}")
    for r in rows:
        split = f"{r['predicted_compute_s'] * 1e3:.2f}+{r['predicted_comm_s'] * 1e3:.2f}"
        print(
            f"{r['tp']:>3} {r['measured_median_s'] * 1e3:>12.2f} {r['measured_p90_s'] * 1e3:>8.2f} "
            f"{r['predicted_s'] * 1e3:>13.2f} {split:>16} {r['error']:>+7.1%}"
        )
    print(
        f"R(2): measured {rows[1]['R_measured']:.2f}, predicted {rows[1]['R_predicted']:.2f}; alpha "
        f"{result['fit']['alpha_s'] * 1e6:.0f} us, {result['fit']['bandwidth_GBps']:.2f} GB/s; matmul "
        f"{result['matmul_flops'][1] / 1e9:.1f} / {result['matmul_flops'][2] / 1e9:.1f} GFLOP/s (tp 1/2)"
    )
    print(f"written {path}, {png}")
    return record
