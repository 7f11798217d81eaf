"""Communication overlap (issue 5): the Megatron MLP (column h->4h, GELU, row 4h->h, fp32) on 2 gloo ranks with
overlap off and on, and sequence parallelism chunked k in {1, 2, 4}, interleaved step by step.

    OMP_NUM_THREADS=1 THP_MEM_ALLOC_ENABLE=1 python bench/overlap.py [--hidden 2048 --tokens 512 --rounds 12]

(also runs under `torchrun --nproc_per_node 2 bench/overlap.py`.)

Per configuration and step: wall time of forward + backward (+ reading one element of y and dx), the exposed
communication (what the compute thread spent inside collectives: blocking ones whole, async ones their issue +
wait, from the profiler's events), what the async ones hid (issue-to-done minus exposed), and the layers'
compute time (profiler compute events: for overlapped layers their span less the exposed comm). Each value is
max-reduced over the ranks per step (outside the timed region); medians / p90 over steps. Configurations run
round-robin, the first one rotating every round, so the shared machine's drift hits all alike.

Then a contention probe: a matmul alone, a blocking all-gather alone, and the matmul with the all-gather in
flight (async): on CPU the collective is work for the same cores (gloo's threads: memcpy and loopback TCP), so
time "hidden" behind a matmul may reappear as a slower matmul. And an alpha-beta fit of the all-gather here,
fed with the measured column matmul time to costmodel.best_chunks: the predicted best k.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates anything
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shardwise  # noqa: E402
from shardwise import costmodel  # noqa: E402
from shardwise.planner import calibration as calibrate  # noqa: E402
from shardwise.sharding import shard_spec, take  # noqa: E402

# (name, sequence_parallel, overlap, chunks)
CONFIGS = [
    ("tp off", False, False, 1),
    ("tp on", False, True, 1),
    ("sp off", True, False, 1),
    ("sp on k=1", True, True, 1),
    ("sp on k=2", True, True, 2),
    ("sp on k=4", True, True, 4),
]


class MLP(nn.Module):
    def __init__(self, up: nn.Linear, down: nn.Linear, mesh, sp: bool, overlap: bool, chunks: int):
        super().__init__()
        kw = dict(sequence_parallel=sp, overlap=overlap, chunks=chunks)
        self.up = shardwise.ColumnParallelLinear.from_dense(up, mesh, **kw)
        self.down = shardwise.RowParallelLinear.from_dense(down, mesh, **kw)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _step_numbers(prof) -> dict:
    """The last step's exposed and hidden comm and compute, ms, from the profiler's events."""
    rec = prof.steps[-1]
    coll = prof.collectives[len(prof.collectives) - rec["collectives"] :]
    comp = prof.computes[len(prof.computes) - rec["computes"] :]
    exposed = sum(e.seconds for e in coll)
    hidden = sum(e.inflight_s - e.seconds for e in coll if e.async_op)
    return {"exposed_ms": exposed * 1e3, "hidden_ms": hidden * 1e3,
            "compute_ms": sum(e.seconds for e in comp) * 1e3,
            "up_fwd_ms": sum(e.seconds for e in comp if e.tag == "up" and e.phase == "fwd") * 1e3}  # fmt: skip


def check(models, x_full, dy_full, up, down, mesh) -> dict:
    """Max abs error of y, dx and every parameter grad against the dense model, max over ranks."""
    xd = x_full.clone().requires_grad_()
    dense = nn.Sequential(up, nn.GELU(), down)
    yd = dense(xd)
    yd.backward(dy_full)
    full = {"up.weight": up.weight.grad, "up.bias": up.bias.grad, "down.weight": down.weight.grad,
            "down.bias": down.bias.grad}  # fmt: skip
    errors = {}
    for name, sp, model in models:
        x, dy, rows = _inputs(x_full, dy_full, mesh, sp)
        x.requires_grad_()
        y = model(x)
        y.backward(dy)
        errs = [(y.detach() - yd.detach()[rows]).abs().max().item(), (x.grad - xd.grad[rows]).abs().max().item()]
        for pname, p in model.named_parameters():
            want = take(full[pname], shard_spec(p))
            errs.append((p.grad - want).abs().max().item())
            p.grad = None
        errors[name] = max(_max_over_ranks(errs))
    return errors


def _inputs(x_full, dy_full, mesh, sp):
    tokens = x_full.shape[0]
    rows = slice(mesh.tp_rank * tokens // 2, (mesh.tp_rank + 1) * tokens // 2) if sp else slice(None)
    return x_full[rows].clone(), dy_full[rows].clone(), rows


def timed_rounds(models, inputs, warmup: int, rounds: int) -> dict[str, list[dict]]:
    profs = {name: shardwise.profile(model) for name, _, model in models}
    out = {name: [] for name, _, _ in models}
    sink = 0.0
    n = len(models)
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            row = {}
            for j in range(n):
                name, _, model = models[(j + r) % n]
                x, dy = inputs[name]
                x.grad = None
                for p in model.parameters():
                    p.grad = None
                prof = profs[name]
                dist.barrier()
                with prof:
                    prof.begin()
                    t0 = time.perf_counter()
                    y = model(x)
                    y.backward(dy)
                    sink += y.reshape(-1)[0].item() + x.grad.reshape(-1)[0].item()
                    wall = time.perf_counter() - t0
                    prof.step()
                row[name] = {"wall_ms": wall * 1e3, **_step_numbers(prof)}
                del y
            keys = sorted(row)
            fields = list(row[keys[0]])
            flat = _max_over_ranks([row[k][f] for k in keys for f in fields])
            if r >= warmup:
                for i, k in enumerate(keys):
                    out[k].append(dict(zip(fields, flat[i * len(fields) : (i + 1) * len(fields)], strict=True)))
            gc.collect()  # untimed
    finally:
        gc.enable()
    assert sink == sink
    last = {name: [(e.phase, e.op, e.numel) for e in profs[name].collectives[-profs[name].steps[-1]["collectives"] :]]
            for name in profs}  # fmt: skip
    return out, last


def probe(mesh, tokens: int, hidden: int, ffn_local: int, reps: int) -> dict:
    """Matmul alone, all-gather alone, matmul with the all-gather in flight; medians of the max over ranks."""
    x = torch.randn(tokens, hidden)
    w = torch.randn(ffn_local, hidden)
    local = torch.randn(tokens // mesh.tp_size, hidden)
    out = torch.empty(tokens, hidden)
    group = mesh.tp_group
    rows = {"matmul_alone_ms": [], "allgather_alone_ms": [], "matmul_with_allgather_ms": [],
            "allgather_inflight_ms": [], "allgather_wait_after_matmul_ms": [],
            "matmul_one_rank_only_ms": []}  # fmt: skip
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        if mesh.tp_rank == 0:  # the other rank idles: what one rank's matmul costs without its neighbour's
            F.linear(x, w)
        solo = time.perf_counter() - t if mesh.tp_rank == 0 else 0.0
        dist.barrier()
        t0 = time.perf_counter()
        F.linear(x, w)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        dist.all_gather_single(out, local, group=group)
        t3 = time.perf_counter()
        dist.barrier()
        t4 = time.perf_counter()
        work = dist.all_gather_single(out, local, group=group, async_op=True)
        t5 = time.perf_counter()
        F.linear(x, w)
        t6 = time.perf_counter()
        work.wait()
        t7 = time.perf_counter()
        vals = _max_over_ranks([t1 - t0, t3 - t2, t6 - t5, t7 - t4, t7 - t6, solo])
        for key, v in zip(rows, vals, strict=True):
            rows[key].append(v * 1e3)
    return {k: statistics.median(v) for k, v in rows.items()}


def fit_all_gather(mesh) -> dict:
    points = []
    for nbytes in (64 * 2**10, 512 * 2**10, 2 * 2**20, 4 * 2**20, 8 * 2**20):
        fn, numel = calibrate.collective("all_gather", nbytes, mesh)
        points.append((numel * 4, calibrate.median_time(fn, reps=5)))
    return calibrate.fit(points)


def summarise(times: dict[str, list[dict]]) -> dict:
    off = {"tp": "tp off", "sp": "sp off"}
    rows = {}
    for name, steps in times.items():
        med = {f: statistics.median(s[f] for s in steps) for f in steps[0]}
        p90 = {f: _quantile([s[f] for s in steps], 0.9) for f in steps[0]}
        base = times[off[name[:2]]]
        rows[name] = {
            "steps": len(steps),
            "median": med,
            "p90": p90,
            # per round, this config / overlap off in the same round: the machine's drift cancels
            **{f"{f}_ratio_vs_off": _paired(steps, base, f"{f}_ms") for f in ("wall", "exposed", "compute")},
        }
    return rows


def _paired(steps, base, field):
    return statistics.median(s[field] / b[field] for s, b in zip(steps, base, strict=True))


def _quantile(xs, q):
    xs = sorted(xs)
    k = q * (len(xs) - 1)
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def table(rows: dict) -> str:
    lines = ["| config | step ms (p90) | exposed comm ms (p90) | comm in flight behind compute ms | layer compute ms | "
             "step / off | exposed / off | compute / off |", "|" + " --- |" * 8]  # fmt: skip
    for name, r in rows.items():
        m, p = r["median"], r["p90"]
        lines.append(f"| {name} | {m['wall_ms']:.1f} ({p['wall_ms']:.1f}) | {m['exposed_ms']:.2f} "
                     f"({p['exposed_ms']:.2f}) | {m['hidden_ms']:.2f} | {m['compute_ms']:.1f} | "
                     f"{r['wall_ratio_vs_off']:.3f} | {r['exposed_ratio_vs_off']:.3f} | "
                     f"{r['compute_ratio_vs_off']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def run(args) -> dict | None:
    torch.set_num_threads(1)
    mesh = shardwise.init_mesh(2)
    started, load_start = time.time(), os.getloadavg()
    h, tokens = args.hidden, args.tokens
    torch.manual_seed(0)
    up, down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
    x_full, dy_full = torch.randn(tokens, h), torch.randn(tokens, h)
    models = [(name, sp, MLP(up, down, mesh, sp, ov, k)) for name, sp, ov, k in CONFIGS]
    errors = check(models, x_full, dy_full, up, down, mesh)
    inputs = {name: _inputs(x_full, dy_full, mesh, sp)[:2] for name, sp, _ in models}
    for x, _ in inputs.values():
        x.requires_grad_()
    times, collectives = timed_rounds(models, inputs, args.warmup, args.rounds)
    rows = summarise(times)
    contention = probe(mesh, tokens, h, 4 * h // 2, reps=args.probe_reps)
    fit = fit_all_gather(mesh)
    up_fwd_s = rows["sp off"]["median"]["up_fwd_ms"] / 1e3
    best_k = costmodel.best_chunks(fit["alpha_s"], fit["beta_s_per_byte"], tokens * h * 4, up_fwd_s)
    if mesh.tp_rank != 0:
        return None
    date = datetime.date.today().isoformat()
    result = {
        "bench": "overlap", "date": date, "hidden": h, "ffn": 4 * h, "tokens": tokens, "tp": 2, "dtype": "fp32",
        "command": "OMP_NUM_THREADS=1 THP_MEM_ALLOC_ENABLE=1 python bench/overlap.py "
                   f"--hidden {h} --tokens {tokens} --rounds {args.rounds} --warmup {args.warmup}",
        "max_abs_error_vs_dense": errors, "configs": rows, "steps": times, "collectives_per_step": collectives,
        "probe": contention, "all_gather_fit": fit,
        "best_chunks": {"predicted_k": best_k, "column_fwd_matmul_ms": up_fwd_s * 1e3,
                        "all_gather_bytes": tokens * h * 4},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")}},
        "wall_s": time.time() - started,
    }  # fmt: skip
    out = Path(args.out or Path(__file__).parent / "results" / f"overlap-{date}{args.tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table(rows))
    print(f"max abs error vs dense: {errors}")
    print("probe (ms, median of max over ranks):", {k: round(v, 2) for k, v in contention.items()})
    print(f"all-gather fit: alpha {fit['alpha_s'] * 1e6:.0f} us, {fit['bandwidth_GBps']:.2f} GB/s; "
          f"column fwd matmul {up_fwd_s * 1e3:.1f} ms -> best_chunks predicts k={best_k}")  # fmt: skip
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds (each runs every config once)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--probe-reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/overlap-<date>.json)")
    ap.add_argument("--tag", default="", help="suffix for the default JSON name")
    args = ap.parse_args()
    if "RANK" in os.environ:  # under torchrun
        run(args)
    else:
        shardwise.launch(run, 2, args)


if __name__ == "__main__":
    main()
