"""Where a blocking collective's time goes inside a real training step: waiting for the last rank to arrive, or
the exchange after it. Run by torchrun (inside `shardwise lab` nodes or on one box); every rank records each
collective's issue and finish on time.perf_counter() (CLOCK_MONOTONIC: one clock for every process on one
machine, lab namespaces included), rank 0 matches the i-th collective of every rank of the tp group.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/collective_timeline.py --layout 2:1:tp-inner:0

Per layout prints (and writes with --out) per collective kind (op, bytes): calls per step, the mean time a rank
spends in the call, split into the wait for the last rank's arrival and the part after it, and the mean gap
between two consecutive collectives (the compute segment) with the spread of that gap between ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_step  # noqa: E402

import shardwise  # noqa: E402
from shardwise.comm import events  # noqa: E402
from shardwise.nn import GPT, GPTConfig  # noqa: E402


class Recorder:
    def __init__(self):
        self.calls: list[list] = []  # [op, nbytes, tag, phase, start, end, group_size]

    def __call__(self, ev) -> None:
        if isinstance(ev, events.CollectiveEvent):
            self.calls.append([ev.op, ev.nbytes, ev.tag, ev.phase, ev.start, ev.start + (ev.seconds or 0.0),
                               ev.group_size])  # fmt: skip


def run(args, layout: dict) -> dict | None:
    mesh = lab_step.build_mesh(layout)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
                    sequence_parallel=layout["sequence_parallel"])  # fmt: skip
    model = lab_step.wrap_dp(GPT(cfg, mesh), mesh, 25.0)
    opt = lab_step.optimizer(model.parameters(), mesh)
    args.micro_batch = 1
    data = [lab_step.batch(args, mesh, s) for s in range(2)]

    def step(s):
        for ids, targets in data[s % 2]:
            loss = model(ids, targets) / len(data[0])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    for s in range(2):
        step(s)
    rec = Recorder()
    events.add_observer(rec)
    dist.barrier()
    t0 = time.perf_counter()
    for s in range(args.steps):
        step(s)
    wall = time.perf_counter() - t0
    events.remove_observer(rec)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"calls": rec.calls, "dp_rank": mesh.dp_rank, "wall": wall})
    shardwise.mesh.destroy_mesh()
    if dist.get_rank() != 0:
        return None
    return summarize(everyone, layout, args.steps)


def summarize(everyone: list[dict], layout: dict, steps: int) -> dict:
    # the tp group of rank 0: ranks with the same dp rank
    group = [r for r, e in enumerate(everyone) if e["dp_rank"] == everyone[0]["dp_rank"]]
    calls = [[c for c in everyone[r]["calls"] if c[6] > 1 and c[2] != "dp_grad_sync"] for r in group]
    n = min(len(c) for c in calls)
    kinds: dict = defaultdict(lambda: {"n": 0, "in_call": [], "wait": [], "after": [], "spread": []})
    gaps, gap_spread = [], []
    for i in range(n):
        row = [c[i] for c in calls]
        arrive = [c[4] for c in row]
        last = max(arrive)
        k = kinds[f"{row[0][0]}:{row[0][1]}"]
        k["n"] += 1
        for c in row:
            k["in_call"].append(c[5] - c[4])
            k["wait"].append(last - c[4])
            k["after"].append(c[5] - last)
        k["spread"].append(last - min(arrive))
        if i:
            per = [calls[j][i][4] - calls[j][i - 1][5] for j in range(len(group))]
            gaps.append(statistics.mean(per))
            gap_spread.append(max(per) - min(per))
    mean = lambda xs: statistics.mean(xs) * 1e3 if xs else 0.0  # noqa: E731
    out = {"layout": lab_step.layout_name(layout), "group": group, "steps": steps,
           "step_ms": statistics.mean(e["wall"] for e in everyone) / steps * 1e3,
           "gap_ms": mean(gaps), "gap_spread_ms": mean(gap_spread),
           "kinds": {k: {"per_step": v["n"] / steps, "in_call_ms": mean(v["in_call"]), "wait_ms": mean(v["wait"]),
                         "after_ms": mean(v["after"]), "arrival_spread_ms": mean(v["spread"])}
                     for k, v in sorted(kinds.items())}}  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layout", action="append", default=[])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dist.init_process_group("gloo")
    results = [run(args, lab_step.parse_layout(t)) for t in args.layout or ["2:1:tp-inner:0"]]
    if dist.get_rank() == 0:
        for r in results:
            print(f"{r['layout']}: step {r['step_ms']:.1f} ms, gap between collectives {r['gap_ms']:.2f} ms "
                  f"(spread between ranks {r['gap_spread_ms']:.2f})")  # fmt: skip
            for k, v in r["kinds"].items():
                print(f"  {k:>24} x{v['per_step']:.0f}/step: in call {v['in_call_ms']:.2f} ms = wait "
                      f"{v['wait_ms']:.2f} + after last arrival {v['after_ms']:.2f}; arrival spread "
                      f"{v['arrival_spread_ms']:.2f}")  # fmt: skip
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
