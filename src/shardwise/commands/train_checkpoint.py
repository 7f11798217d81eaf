"""`shardwise train`'s checkpoints: one atomic unit holding the model, the Adam state (sharded like the parameters,
so it reshards too) and every rank's RNG state, written by ONE save_sharded call, so one index names them all with
one step, and a kill at any moment of a save leaves the previous checkpoint or the new one, never a mix."""

from __future__ import annotations

import base64
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import load_sharded, read_index, save_sharded
from ..data_parallel import load_optimizer_states, optimizer_states
from ..sharding import copy_shard_info

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


def save_checkpoint(directory: Path, model, opt, mesh, step: int, cfg, losses: list, evals: list) -> None:
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
