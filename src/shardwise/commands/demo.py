"""`shardwise demo`: the classic tensor-parallel walkthrough, end to end, on local gloo ranks.

A Megatron MLP block and a transformer block are trained together with Adam on synthetic data.
Rank 0 also trains the dense model (the same classes at tp=1, same seed) on the same batches and
compares outputs every step; every collective and layer compute is profiled.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import shardwise
from shardwise import comm
from shardwise.comm import CollectiveEvent, CollectiveStart
from shardwise.nn import ParallelMLP, ParallelTransformerBlock
from shardwise.profiler import Profile
from shardwise.sharding import full_parameters

from . import plots


@dataclass
class DemoConfig:
    tp: int = 2
    steps: int = 300
    hidden: int = 256
    heads: int = 8
    seq: int = 64
    batch: int = 4
    lr: float = 1e-3
    sequence_parallel: bool = False
    check: bool = True  # rank 0 trains the dense model beside and compares every step
    warmup: int = 5  # steps left out of the per-layer averages
    seed: int = 0
    report: str = "shardwise-demo.json"
    progress: bool = True
    overlap: bool = False  # overlapped collectives, run beside the same model without, interleaved
    chunks: int = 1
    narrate: int = 0  # steps (from the first) whose collectives are told line by line as they start and finish


class DemoModel(nn.Module):
    """x: [s, b, h] (sequence_parallel: [s/tp, b, h]) -> same: x + MLP(x), then a transformer block."""

    def __init__(self, cfg: DemoConfig, mesh: shardwise.Mesh, overlap: bool = False):
        super().__init__()
        sp = cfg.sequence_parallel and mesh.tp_size > 1
        chunks = cfg.chunks if overlap else 1
        self.mlp = ParallelMLP(cfg.hidden, 4 * cfg.hidden, sequence_parallel=sp, mesh=mesh, overlap=overlap,
                               chunks=chunks)  # fmt: skip
        self.block = ParallelTransformerBlock(cfg.hidden, cfg.heads, sequence_parallel=sp, mesh=mesh, overlap=overlap,
                                              chunks=chunks)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.mlp(x))


class Narrator:
    """A comm observer telling each collective as it starts and finishes, for a learner to follow what the
    ranks wait on: `[rank 1] mlp.down fwd all_reduce 256.0 KiB over 2 ranks: finished, waited 0.412 ms`."""

    def __init__(self, rank: int, out=None):
        self.rank, self.out = rank, out

    def __call__(self, event) -> None:
        if isinstance(event, CollectiveStart):
            kind = "async, in flight behind compute" if event.async_op else "blocking"
            self._say(event, f"started ({kind})")
        elif isinstance(event, CollectiveEvent):
            event = event.resolve()  # CUDA: its time, read now
            waited = event.wait_s if event.async_op else event.seconds
            self._say(event, f"finished, waited {waited * 1e3:.3f} ms")

    def _say(self, event, what: str) -> None:
        out = self.out or sys.stdout
        # one write per line: the ranks share the terminal, and print() would write the newline apart
        out.write(f"[rank {self.rank}] {event.tag} {event.phase} {event.op} {event.nbytes / 1024:.1f} KiB "
                  f"({event.nbytes} bytes) over {event.group_size} ranks: {what}\n")  # fmt: skip
        out.flush()


def _gather_tokens(x: torch.Tensor, mesh: shardwise.Mesh) -> torch.Tensor:
    # A plain collective, outside autograd and the profile: only the dense check uses it.
    out = x.new_empty((mesh.tp_size * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=mesh.tp_group)
    return out


def run_rank(cfg: DemoConfig) -> dict | None:
    mesh = shardwise.init_mesh(cfg.tp)
    sp = cfg.sequence_parallel and mesh.tp_size > 1
    if sp and cfg.seq % mesh.tp_size:
        raise ValueError(f"--sequence-parallel needs --seq divisible by --tp; got seq={cfg.seq}, tp={cfg.tp}")
    lead = mesh.tp_rank == 0
    torch.manual_seed(cfg.seed)
    model = DemoModel(cfg, mesh, overlap=cfg.overlap)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    twin = None
    if cfg.overlap:  # the same model without overlap, stepped alternately on the same batches
        torch.manual_seed(cfg.seed)
        twin = DemoModel(cfg, mesh)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=cfg.lr)
        twin_prof = Profile(twin)
    dense = dense_opt = None
    if lead and cfg.check:
        torch.manual_seed(cfg.seed)
        dense = DemoModel(cfg, shardwise.Mesh.single())
        dense_opt = torch.optim.Adam(dense.parameters(), lr=cfg.lr)

    data = torch.Generator().manual_seed(cfg.seed + 1)
    target_map = torch.randn(cfg.hidden, cfg.hidden, generator=data) / cfg.hidden**0.5
    bar = _progress(cfg) if lead else None
    max_diff_seen = 0.0
    narrator = Narrator(mesh.rank)
    with Profile(model) as prof:
        for step in range(cfg.steps):
            x = torch.randn(cfg.seq, cfg.batch, cfg.hidden, generator=data)
            target = torch.tanh(x @ target_map)  # a smooth function to fit: the loss must fall
            mine = slice(mesh.tp_rank * cfg.seq // mesh.tp_size, (mesh.tp_rank + 1) * cfg.seq // mesh.tp_size)
            x_local, target_local = (x[mine], target[mine]) if sp else (x, target)
            narrating = step < cfg.narrate
            if narrating:
                sys.stdout.write(f"[rank {mesh.rank}] --- step {step}: forward, backward, Adam ---\n")
                comm.add_observer(narrator, starts=True)
            prof.begin()
            out = model(x_local)
            # Sum over this rank's tokens / all tokens: with sequence parallelism the ranks' losses add up.
            loss = ((out - target_local) ** 2).sum() / target.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            record = prof.step()
            if narrating:
                comm.remove_observer(narrator)
            if twin is not None:
                with prof.paused(), twin_prof:
                    twin_prof.begin()
                    twin_loss = ((twin(x_local) - target_local) ** 2).sum() / target.numel()
                    twin_loss.backward()
                    twin_opt.step()
                    twin_opt.zero_grad(set_to_none=True)
                    twin_prof.step()

            # Everything below is bookkeeping, outside the timed step.
            full_loss = loss.detach().clone()
            if sp:
                dist.all_reduce(full_loss, group=mesh.tp_group)
            record["loss"] = float(full_loss)
            if cfg.check:
                full_out = _gather_tokens(out.detach(), mesh) if sp else out.detach()
                if dense is not None:
                    with prof.paused():
                        dense_out = dense(x)
                        dense_loss = ((dense_out - target) ** 2).mean()
                        dense_loss.backward()
                        dense_opt.step()
                        dense_opt.zero_grad(set_to_none=True)
                    diff = (full_out - dense_out.detach()).abs().max().item()
                    record["max_abs_diff"] = diff
                    record["dense_loss"] = dense_loss.item()
                    max_diff_seen = max(max_diff_seen, diff)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", diff=f"{record.get('max_abs_diff', 0):.1e}",
                                comm=f"{record['comm_ms']:.2f}ms", R=f"{record['R']:.2f}")  # fmt: skip
    if bar is not None:
        bar.close()

    final = full_parameters(model, mesh)
    if not lead:
        return None
    trace = cfg.report.removesuffix(".json") + "-trace.json"
    prof.to_chrome_trace(trace, rank=mesh.rank)
    weight_diff = None
    if dense is not None:
        weight_diff = max((final[n] - p.detach()).abs().max().item() for n, p in dense.named_parameters())
    return {
        "config": asdict(cfg),
        "world": {"tp": mesh.tp_size, "backend": dist.get_backend(), "threads_per_rank": torch.get_num_threads()},
        "max_abs_diff_output": max_diff_seen if dense is not None else None,
        "max_abs_diff_weights_after_training": weight_diff,
        **prof.to_dict(skip_steps=min(cfg.warmup, cfg.steps - 1)),
        "summary_table": prof.summary(skip_steps=min(cfg.warmup, cfg.steps - 1)),
        "trace": trace,
        "overlap_comparison": _compare(prof, twin_prof, cfg) if twin is not None else None,
    }


def _compare(on: Profile, off: Profile, cfg: DemoConfig) -> dict:
    """Median step time and exposed collective time (what the compute thread waited) of both runs."""
    skip = min(cfg.warmup, cfg.steps - 1)

    def medians(prof: Profile) -> dict:
        steps = prof.steps[skip:]
        mid = lambda key: sorted(s[key] for s in steps)[len(steps) // 2]
        return {"step_ms": mid("wall_ms"), "exposed_comm_ms": mid("comm_ms")}

    result = {"overlap_off": medians(off), "overlap_on": medians(on)}
    for key in ("step_ms", "exposed_comm_ms"):
        result[f"{key}_change"] = result["overlap_on"][key] / max(result["overlap_off"][key], 1e-9) - 1
    return result


def _progress(cfg: DemoConfig):
    if not cfg.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, desc=f"tp={cfg.tp} train", unit="step", file=sys.stderr, dynamic_ncols=True)


def main(cfg: DemoConfig, tolerance: float = 1e-4) -> int:
    print(f"shardwise demo: {cfg.tp} gloo ranks, MLP block + transformer block, hidden={cfg.hidden}, "
          f"heads={cfg.heads}, tokens={cfg.seq}x{cfg.batch}, sequence_parallel={cfg.sequence_parallel}, "
          f"{cfg.steps} Adam steps")  # fmt: skip
    start = time.perf_counter()
    results = shardwise.launch(run_rank, cfg.tp, cfg)
    report = results[0]
    elapsed = time.perf_counter() - start
    steps = report["steps"][min(cfg.warmup, cfg.steps - 1) :]
    median = lambda key: sorted(s[key] for s in steps)[len(steps) // 2]
    print()
    print(report["summary_table"])
    print()
    print(f"per step (median, rank 0): wall {median('wall_ms'):.2f} ms, in collectives {median('comm_ms'):.2f} ms, "
          f"compute {median('compute_ms'):.2f} ms, R = comm/compute = {median('R'):.2f}")  # fmt: skip
    print(f"loss {report['steps'][0]['loss']:.4f} -> {report['steps'][-1]['loss']:.4f}")
    cmp = report.get("overlap_comparison")
    if cmp:
        off, on = cmp["overlap_off"], cmp["overlap_on"]
        print(f"overlap (chunks={cfg.chunks}), medians: step {off['step_ms']:.2f} -> {on['step_ms']:.2f} ms "
              f"({cmp['step_ms_change']:+.1%}), exposed comm {off['exposed_comm_ms']:.2f} -> "
              f"{on['exposed_comm_ms']:.2f} ms ({cmp['exposed_comm_ms_change']:+.1%})")  # fmt: skip
    if cfg.check:
        print(
            f"vs dense: max |output diff| over all steps = {report['max_abs_diff_output']:.2e}, "
            f"max |weight diff| after {cfg.steps} steps = {report['max_abs_diff_weights_after_training']:.2e}"
        )
    report["elapsed_s"] = elapsed
    stem = cfg.report.removesuffix(".json")
    title = f"shardwise demo, tp={cfg.tp}{', sequence parallel' if cfg.sequence_parallel else ''} (rank 0)"
    report["plots"] = [
        plots.steps_chart(report["steps"], f"{stem}-steps.png", title),
        plots.layers_chart(report["layers"], f"{stem}-layers.png", title),
    ]
    if cmp:
        report["plots"].append(plots.overlap_chart(cmp, f"{stem}-overlap.png", title))
    with open(cfg.report, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"report: {cfg.report}, trace: {report['trace']}, plots: {', '.join(report['plots'])}   ({elapsed:.1f} s)")
    if cfg.check and report["max_abs_diff_output"] > tolerance:
        print(f"FAIL: tensor-parallel output differs from dense by more than {tolerance:g}", file=sys.stderr)
        return 1
    return 0
