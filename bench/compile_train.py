"""GPT train step, eager vs torch.compile (inductor, fullgraph=True), at tp=1 and tp=2 (2 ranks x 1 thread).

Per tp: one model, its eager step and its compiled step timed in interleaved rounds (eager, compiled, eager, ...),
so load drifting over the run hits both alike; the paired per-round ratio compiled/eager is reported as a median.
Compile time (the first compiled forward + backward) is reported separately. The 1-minute load average is recorded
before and after: this machine is shared, re-run when it is quiet.

    OMP_NUM_THREADS=1 python bench/compile_train.py [--hidden 256 --layers 4 --seq 256 --rounds 15]
writes bench/results/compile-train-2026-11-22.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import shardwise
from shardwise.nn import GPT, GPTConfig

OUT = Path(__file__).resolve().parent / "results" / "compile-train-2026-11-22.json"


def _step(forward, model, opt, ids, targets) -> float:
    """One train step (forward, backward, SGD), wall seconds."""
    begin = time.perf_counter()
    loss = forward(ids, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - begin


def bench_rank(tp: int, hidden: int, layers: int, seq: int, rounds: int) -> dict:
    mesh = shardwise.init_mesh(tp) if tp > 1 else shardwise.Mesh.single()
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=256, hidden=hidden, num_layers=layers, num_heads=max(1, hidden // 64))
    torch.manual_seed(0)
    model = GPT(cfg, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 256, (1, seq), generator=gen), torch.randint(0, 256, (1, seq), generator=gen)
    compiled = torch.compile(model, fullgraph=True)
    begin = time.perf_counter()
    _step(compiled, model, opt, ids, targets)
    compile_s = time.perf_counter() - begin
    for _ in range(2):  # warm both
        _step(model, model, opt, ids, targets)
        _step(compiled, model, opt, ids, targets)
    eager, comp = [], []
    for _ in range(rounds):
        eager.append(_step(model, model, opt, ids, targets))
        comp.append(_step(compiled, model, opt, ids, targets))
    return {"eager_s": eager, "compiled_s": comp, "compile_s": compile_s}


def _summary(tp: int, per_rank: list[dict]) -> dict:
    # A step is as slow as its slowest rank: per round, the max over ranks.
    eager = [max(r["eager_s"][i] for r in per_rank) for i in range(len(per_rank[0]["eager_s"]))]
    comp = [max(r["compiled_s"][i] for r in per_rank) for i in range(len(per_rank[0]["compiled_s"]))]
    return {"tp": tp, "eager_ms": 1e3 * statistics.median(eager), "compiled_ms": 1e3 * statistics.median(comp),
            "ratio_compiled_over_eager": statistics.median(c / e for c, e in zip(comp, eager, strict=True)),
            "compile_s": max(r["compile_s"] for r in per_rank), "rounds": len(eager)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = (args.hidden, args.layers, args.seq, args.rounds)
    load_before = os.getloadavg()[0]
    rows = [_summary(1, [bench_rank(1, *shape)])]
    rows.append(_summary(2, shardwise.launch(bench_rank, 2, 2, *shape, timeout_s=600)))
    result = {"hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": 1, "threads_per_rank": 1,
              "backend": "inductor", "fullgraph": True, "torch": torch.__version__,
              "loadavg_1min": [load_before, os.getloadavg()[0]], "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"h={args.hidden} layers={args.layers} tokens={args.seq}, load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| tp | eager ms/step | compiled ms/step | compiled/eager (paired median) | compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio_compiled_over_eager']:.2f} "
              f"| {r['compile_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
