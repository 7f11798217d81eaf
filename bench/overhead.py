"""Per-step CPU overhead of shardwise vs the minimal reference, with the collectives stubbed out.

On 2 gloo ranks the collectives' latency (0.1-0.3 ms each, long tail) and the shared machine's noise
hide differences of tens of microseconds. Here each rank builds the same tp=2 models as bench/mlp.py
(real process groups, so shardwise's checks pass), then replaces dist.all_reduce / all_gather_single /
reduce_scatter_single with functions that only return (the outputs keep their shapes; values are no
longer right, which does not matter for timing). What is left is each library's own Python and
dispatch cost per forward+backward step plus the (tiny) local compute.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/overhead.py [--profile]

--profile adds a cProfile of shardwise's step on rank 0 (tottime per function: top 15, then shardwise's own).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp as bench  # noqa: E402

import shardwise  # noqa: E402


def _noop(*args, **kwargs):
    return None


def stub_collectives():
    for name in ("all_reduce", "all_gather_single", "reduce_scatter_single"):
        setattr(dist, name, _noop)


def step(model, x, dy, params):
    x.grad = None
    for p in params:
        p.grad = None
    y = model(x)
    y.backward(dy)
    return y.reshape(-1)[0].item() + x.grad.reshape(-1)[0].item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--block", type=int, default=200, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=15, help="blocks per implementation, interleaved")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mesh = shardwise.init_mesh(2)
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group([0, 1])
    h, tokens = args.hidden, args.tokens
    torch.manual_seed(0)
    up, down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
    x_full, dy_full = torch.randn(tokens, h), torch.randn(tokens, h)
    models = {}
    for mode in ("tp", "sp"):
        sp = mode == "sp"
        models[("minimal", mode)] = bench.MinimalMLP(up, down, rank, size, group, sp)
        models[("shardwise", mode)] = bench.shardwise_mlp(up, down, mesh, sp)
    models[("minimal", "tp1")] = bench.MinimalMLP(up, down, 0, 1, None, False)
    models[("shardwise", "tp1")] = bench.shardwise_mlp(up, down, shardwise.Mesh.single(), False)
    models[("dense", "tp1")] = bench.DenseMLP(up, down)
    dist.barrier()
    stub_collectives()  # from here on no rank talks to the other

    cases = {}
    for (name, mode), model in models.items():
        rows = slice(rank * tokens // size, (rank + 1) * tokens // size) if mode == "sp" else slice(None)
        x = x_full[rows].clone().requires_grad_(True)
        cases[(name, mode)] = (model, x, dy_full[rows].clone(), list(model.parameters()))
    keys = list(cases)
    per_step = {k: [] for k in keys}
    for k in keys:  # warm-up
        for _ in range(20):
            step(*cases[k])
    gc.collect()
    gc.disable()
    for b in range(args.blocks):
        for j in range(len(keys)):
            k = keys[(j + b) % len(keys)]
            case = cases[k]
            t0 = time.thread_time()  # CPU time of this thread: time the shared machine gave to others is out
            for _ in range(args.block):
                step(*case)
            per_step[k].append((time.thread_time() - t0) / args.block * 1e6)
    gc.enable()
    if rank == 0:
        print(
            f"h={h} tokens={tokens}: thread CPU us per fwd+bwd step, collectives stubbed "
            f"(median of {args.blocks} blocks of {args.block} steps; min)"
        )
        for mode in ("tp1", "tp", "sp"):
            ref = statistics.median(per_step[("minimal", mode)])
            for name in ("dense", "minimal", "shardwise"):
                if (name, mode) not in per_step:
                    continue
                ts = per_step[(name, mode)]
                med = statistics.median(ts)
                print(f"  {mode:3s} {name:10s} {med:8.1f} us  (min {min(ts):8.1f})  {med - ref:+7.1f} us vs minimal")
    if rank == 0:  # Python function calls per step: a count, so free of the machine's noise
        for k in keys:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                step(*cases[k])
            prof.disable()
            print(f"  python calls per step {k[1]:3s} {k[0]:10s} {pstats.Stats(prof).total_calls / 50:6.0f}")
    if args.profile and rank == 0:
        for mode in ("tp", "sp"):
            case = cases[("shardwise", mode)]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                step(*case)
            prof.disable()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
            stats.print_stats(15)  # everything
            stats.print_stats("shardwise", 30)  # shardwise's own functions
            calls = pstats.Stats(prof).total_calls / 2000
            print(f"\n==== cProfile, shardwise {mode}, 2000 steps: {calls:.0f} Python calls per step ====")
            print(buf.getvalue())
    # no barrier: the collectives are stubbed; each rank just ends


if __name__ == "__main__":
    main()
