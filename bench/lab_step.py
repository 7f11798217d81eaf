"""The workload of the planner benchmarks: a small shardwise GPT training step for one or more layouts, timed.

Run by torchrun (inside `shardwise lab` nodes or on one box):

    THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/lab_step.py \
        --tp 2 --dp 1 --steps 8 --out /tmp/step.json
    ... --layout 2:1:tp-inner:0 --layout 1:2:tp-inner:0     # several layouts in one job, one after the other
    ... --calibrate /tmp/cal.json                            # a quick calibration first (calibrate_here)

A step = forward (loss), backward, Adam step, zero_grad, with dp through shardwise.data_parallel.wrap_ddp (torch
DDP on the dp group, bucketed, overlapped with backward). The global batch (sequences) is the same for every
layout: each dp rank takes global_batch / dp sequences, one micro-batch.

What is timed and why: each rank clocks each step alone (no barrier inside the step: a barrier would add a
collective the training loop does not have and hide the skew between ranks); the step ends when the rank has read
the loss and one updated weight (so nothing in flight is left out). Afterwards the per-step times are gathered and
the step's time is the max over ranks (a parallel step ends when its slowest rank does); we report the median and
p90 over steps, and the window mean (barrier, N steps, barrier: total / N) as a throughput check. Then a few more
steps run under shardwise.profile for the per-layer rows (comm and compute per layer, R; the DDP gradient
all-reduce appears as the "dp_grad_sync" row when the dp axis reports through comm), kept apart from the timed
steps because the profiler's hooks cost time.

Writes JSON from rank 0: {"config", "world", "nodes", "layouts": [{"tp", "dp", "placement", "sequence_parallel",
"median_s", "p90_s", "mean_s", "steps_s", "profile": {"ranks": per rank {"layers": profiler rows,
"block_wall_s": {block: fwd+bwd span per step}}, "steps": rank 0's profiled step records}}]}.
Times in seconds unless a key says ms (the profiler's rows).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

import shardwise
from shardwise.nn import GPT, GPTConfig

PLACEMENTS = ("tp-inner", "dp-inner")


def parse_layout(text: str) -> dict:
    """ "tp:dp[:placement[:sp]]" -> {"tp", "dp", "placement", "sequence_parallel"}; sp is 0/1."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"layout {text!r}: use tp:dp[:placement[:sp]], e.g. 2:1:tp-inner:0")
    placement = parts[2] if len(parts) > 2 else "tp-inner"
    if placement not in PLACEMENTS:
        raise ValueError(f"layout {text!r}: placement must be one of {PLACEMENTS}")
    return {"tp": int(parts[0]), "dp": int(parts[1]), "placement": placement,
            "sequence_parallel": len(parts) > 3 and parts[3] in ("1", "sp", "on", "true")}  # fmt: skip


def layout_name(layout: dict) -> str:
    sp = "+sp" if layout["sequence_parallel"] else ""
    return f"tp{layout['tp']}dp{layout['dp']}-{layout['placement']}{sp}"


def build_mesh(layout: dict):
    """init_mesh with the layout's placement (tp-inner is the default grid, so it works before placement exists)."""
    try:
        return shardwise.init_mesh(layout["tp"], layout["dp"], placement=layout["placement"])
    except TypeError:
        if layout["placement"] != "tp-inner":
            raise RuntimeError("this shardwise has no init_mesh(placement=...): dp-inner needs it") from None
        return shardwise.init_mesh(layout["tp"], layout["dp"])


def wrap_dp(model: torch.nn.Module, mesh, bucket_mb: float):
    """DP's wrap_ddp (torch DDP on the dp group, visible to the profiler); plain torch DDP before it exists."""
    try:
        from shardwise.data_parallel import wrap_ddp
    except ImportError:
        if mesh.dp_size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, process_group=mesh.dp_group, bucket_cap_mb=bucket_mb)
    return wrap_ddp(model, mesh, bucket_mb=bucket_mb)


def optimizer(params, mesh, lr: float = 1e-4):
    try:
        from shardwise.data_parallel import make_optimizer
    except ImportError:
        return torch.optim.Adam(params, lr=lr)
    return make_optimizer(params, mesh, torch.optim.Adam, zero=False, lr=lr)


def inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class BlockSpans:
    """Wall time of each transformer block, forward and backward, from module hooks (profiled steps only): a
    block's compute is its span minus the collectives inside it, so R per layer = comm / that."""

    def __init__(self, model: torch.nn.Module):
        self.spans: dict[str, float] = {}
        self.open: dict[tuple, float] = {}
        self.handles = []
        for i, block in enumerate(inner(model).blocks):
            name = f"blocks.{i}"
            self.handles += [
                block.register_forward_pre_hook(lambda *_, n=name: self._start(n, "fwd")),
                block.register_forward_hook(lambda *_, n=name: self._stop(n, "fwd")),
                block.register_full_backward_pre_hook(lambda *_, n=name: self._start(n, "bwd")),
                block.register_full_backward_hook(lambda *_, n=name: self._stop(n, "bwd")),
            ]

    def _start(self, name: str, phase: str) -> None:
        self.open[name, phase] = time.perf_counter()

    def _stop(self, name: str, phase: str) -> None:
        self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - self.open.pop((name, phase))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batch(args, mesh, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This dp rank's micro-batches [micro_batch, seq] of random ids (the same on every tp rank of a group):
    global_batch / dp sequences per step in all."""
    g = torch.Generator().manual_seed(1000 * step + mesh.dp_rank)
    ids = torch.randint(0, args.vocab, (args.global_batch // mesh.dp_size, args.seq + 1), generator=g)
    mb = args.micro_batch or ids.shape[0]
    return [(c[:, :-1].contiguous(), c[:, 1:].contiguous()) for c in ids.split(mb)]


def run_layout(args, layout: dict) -> dict | None:
    per_rank = args.global_batch // layout["dp"]
    if args.global_batch % layout["dp"] or args.micro_batch and per_rank % args.micro_batch:
        raise ValueError(f"--global-batch {args.global_batch} must split into dp={layout['dp']} ranks x whole "
                         f"micro-batches of --micro-batch {args.micro_batch}")  # fmt: skip
    mesh = build_mesh(layout)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads,
                    sequence_parallel=layout["sequence_parallel"])  # fmt: skip
    model = wrap_dp(GPT(cfg, mesh), mesh, args.bucket_mb)
    opt = optimizer(model.parameters(), mesh)
    probe = next(inner(model).parameters())
    data = [batch(args, mesh, s) for s in range(4)]

    def step(s: int) -> None:
        micro = data[s % len(data)]
        for j, (ids, targets) in enumerate(micro):
            # DDP all-reduces the gradients once, in the last micro-batch's backward
            sync = j == len(micro) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(ids, targets) / len(micro)
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # read the results inside the step: nothing in flight is left out of its time
        _ = float(loss.detach()) + float(probe.detach().reshape(-1)[0])

    for s in range(args.warmup):
        step(s)
    times = []
    dist.barrier()
    window = time.perf_counter()
    for s in range(args.steps):
        start = time.perf_counter()
        step(s)
        times.append(time.perf_counter() - start)
    dist.barrier()
    window = time.perf_counter() - window
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, times)
    per_step = [max(rank_times[i] for rank_times in every) for i in range(args.steps)]

    rows, steps, spans = None, [], {}
    if args.profile_steps:
        with shardwise.profile(inner(model)) as prof:
            step(0)  # a first profiled step, dropped: hooks warm up
            prof.step()
            hooks = BlockSpans(model)
            for s in range(args.profile_steps):
                prof.begin()
                step(s)
                prof.step()
            hooks.remove()
        rows = prof.layers(skip_steps=1)
        steps = prof.steps[1:]
        spans = {name: t / args.profile_steps for name, t in hooks.spans.items()}  # seconds per step
    all_rows = [None] * dist.get_world_size()
    dist.all_gather_object(all_rows, {"layers": rows, "block_wall_s": spans})
    rank = dist.get_rank()
    shardwise.mesh.destroy_mesh()
    if rank != 0:
        return None
    ordered = sorted(per_step)
    return {**layout, "name": layout_name(layout), "median_s": statistics.median(per_step),
            "p90_s": ordered[int(0.9 * (len(ordered) - 1))], "mean_s": window / args.steps, "steps_s": per_step,
            "rank_median_s": [statistics.median(t) for t in every],
            "profile": {"ranks": all_rows, "steps": steps}}  # fmt: skip


def calibrate(path: str, mode: str) -> None:
    """calibrate_here under this job's ranks and link (rank 0 writes the v2 JSON). mode: quick (3 sizes up to 1 MiB,
    3 calls each: fast, noisy under load), medium (the full method with messages up to 8 MiB: covers a small model's
    activations and DDP buckets without minutes of 64 MiB transfers over a slow link), full."""
    from shardwise.planner.calibration import calibrate_here

    if mode == "quick":
        result = calibrate_here(None, quick=True)
    else:
        result = calibrate_here(None, quick=False, max_bytes=8 * 2**20 if mode == "medium" else 64 * 2**20)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=None)
    ap.add_argument("--dp", type=int, default=None)
    ap.add_argument("--placement", choices=PLACEMENTS, default="tp-inner")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--layout", action="append", default=[], help="tp:dp[:placement[:sp]], repeatable")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=4, help="sequences per step, all dp ranks together")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per micro-batch (0: global_batch / dp)")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--calibrate", default=None, help="run calibrate_here first and write its JSON here")
    ap.add_argument("--calibration-mode", choices=("quick", "medium", "full"), default="quick")
    ap.add_argument("--out", default=None, help="JSON written by rank 0 (default: stdout)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="dump every thread's stack and exit after this")
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout_s, exit=True)  # never hang: a stuck rank says where it is
    layouts = [parse_layout(t) for t in args.layout]
    if args.tp is not None or not layouts:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tp = args.tp or 1
        layouts.append({"tp": tp, "dp": args.dp or world // tp, "placement": args.placement,
                        "sequence_parallel": args.sequence_parallel})  # fmt: skip
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.calibrate:
            calibrate(args.calibrate, args.calibration_mode)
        results = [run_layout(args, layout) for layout in layouts]
    finally:
        # tear every gloo group down before exit, all ranks together: a worker exiting with gloo groups alive
        # (the calibration builds a dozen) aborts intermittently in their threads at interpreter exit
        # ("terminate called without an active exception", SIGABRT after the work was done: it failed lab jobs)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        record = {
            "config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "seq", "global_batch",
                                                      "micro_batch", "bucket_mb", "steps", "warmup", "profile_steps")},
            "world": world, "nodes": int(os.environ.get("SHARDWISE_LAB_NODES", "1")),
            "procs_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            "link_rate": os.environ.get("SHARDWISE_LAB_RATE"), "host": platform.node(),
            "threads_per_rank": torch.get_num_threads(), "layouts": results,
        }  # fmt: skip
        text = json.dumps(record, indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
