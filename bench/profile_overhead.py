"""What profiling costs: the demo's model (MLP block + transformer block, h=256, 64x4 tokens, tp=2),
steps with the profiler on and off interleaved round-robin on the same 2 gloo ranks; max over ranks
per step, median over steps. Writes bench/results/profile-overhead-<date>.json.

    THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 python bench/profile_overhead.py [--steps 200]
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise
from shardwise.commands.demo import DemoConfig, DemoModel


def run(steps: int, hidden: int) -> dict | None:
    mesh = shardwise.init_mesh(2)
    cfg = DemoConfig(hidden=hidden, heads=8)
    torch.manual_seed(0)
    model = DemoModel(cfg, mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(cfg.seq, cfg.batch, cfg.hidden)
    prof = shardwise.profile(model)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        out = model(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = float(out[0, 0, 0])
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    for _ in range(10):
        step()
    times = {"off": [], "on": []}
    for _ in range(steps):
        times["off"].append(step())
        with prof:
            prof.begin()
            times["on"].append(step())
            prof.step()
    return times if mesh.tp_rank == 0 else None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=256)
    a = ap.parse_args()
    times = shardwise.launch(run, 2, a.steps, a.hidden)[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    p90 = {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in times.items()}
    overhead = med["on"] / med["off"] - 1
    print(f"profiler off: median {med['off'] * 1e3:.2f} ms (p90 {p90['off'] * 1e3:.2f}); "
          f"on: median {med['on'] * 1e3:.2f} ms (p90 {p90['on'] * 1e3:.2f}); overhead {overhead:+.1%}")
    out = Path(__file__).resolve().parent / "results" / f"profile-overhead-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"steps": a.steps, "hidden": a.hidden, "median_s": med, "p90_s": p90,
                               "overhead": overhead, "times": times}, indent=1))
    print(f"written {out}")
