"""Data parallelism beside tensor parallelism, through torch's own DDP and ZeRO-1 on the mesh's dp group.

    wrap_ddp(model, mesh)        torch DistributedDataParallel over mesh.dp_group: gradients bucketed and
                                 all-reduced (averaged) in gloo/NCCL's background while backward still runs
    make_optimizer(params, mesh, torch.optim.Adam, zero=True, lr=...)
                                 torch ZeroRedundancyOptimizer over mesh.dp_group: each dp rank keeps the
                                 optimizer state of 1/dp of the parameters and broadcasts its updated ones
    average_gradients(model, mesh)  the old hand-written fallback: one blocking flat all-reduce after backward

Each dp rank holds the same tp shard as its dp peers (same tp_rank), so DDP's per-rank view of "the model"
is this rank's shards: the dp group never mixes different slices. DDP's bucket all-reduce goes through a comm
hook that issues it via comm's choke point (`run_collective`), so shardwise's observers and profiler see it as
an async all_reduce tagged "dp_grad_sync" (phase "bwd", group_size = dp): its `inflight_s` is the all-reduce's
duration, `seconds` only the time the autograd thread spent issuing it (DDP overlaps the rest with backward;
what backward's end still waits for is not in the event).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import comm
from .mesh import Mesh

DP_TAG = "dp_grad_sync"  # the tag observers see on the dp gradient all-reduce


def _dp_group_or_error(mesh: Mesh, what: str):
    if mesh.dp_group is None or not dist.is_initialized():
        raise ValueError(f"{what} with dp={mesh.dp_size} needs the mesh's dp process group: build it with init_mesh()")
    return mesh.dp_group


def grad_sync_hook(mesh: Mesh, bucket):  # no annotations: DDP compares them with the classes, not strings
    """DDP comm hook (state = the mesh), bucket a dist.GradBucket: bucket.buffer(), a flat [n] tensor of this
    rank's grads -> a torch.futures.Future of
    their mean over the dp ranks, computed in place. Divides before summing, as DDP's default
    hook does (no overflow in low precision); the all-reduce is issued through comm.run_collective."""
    flat = bucket.buffer()
    flat.div_(mesh.dp_size)
    futures = []

    def issue(async_op: bool):
        # The Pending waits on what this returns: the work's Future, whose wait() returns at once inside its own
        # callback below (the Work's wait() would deadlock there, in the backend's thread).
        futures.append(dist.all_reduce(flat, group=mesh.dp_group, async_op=True).get_future())
        return futures[-1]

    pending = comm.run_collective("all_reduce", flat.numel(), flat, flat, mesh.dp_size, DP_TAG, "bwd", issue,
                                  async_op=True, group=mesh.dp_group, debug=mesh.debug)  # fmt: skip
    # The Pending reports the event to the observers once waited on: do that when the all-reduce completes,
    # handing DDP the averaged bucket.
    return futures[0].then(lambda _: pending.wait())


def wrap_ddp(model: torch.nn.Module, mesh: Mesh, bucket_mb: float = 25, **ddp_kwargs) -> torch.nn.Module:
    """`model` (this rank's tp shards) as torch DistributedDataParallel over mesh.dp_group; the model itself when
    dp == 1. Construction broadcasts parameters and buffers from dp rank 0 of each dp group (collective over
    the dp group: every rank calls it). `bucket_mb`: DDP's bucket_cap_mb (gradients per all-reduce, MiB).
    `ddp_kwargs` go to DDP; `forward_sync_buffers` defaults to False here (buffers are still synced once, at
    construction), since shardwise's buffers are constants and re-broadcasting them every forward would be dp
    traffic no model accounts for: pass True for models whose buffers change in forward (BatchNorm).
    Parameters some steps leave without a grad need `find_unused_parameters=True`, as with any DDP model.
    The DDP module's forward is the model's; profile, checkpoint and evaluate the inner model (`ddp.module`)."""
    if mesh.dp_size == 1:
        return model
    group = _dp_group_or_error(mesh, "wrap_ddp")
    if "broadcast_buffers" not in ddp_kwargs:  # torch's older name for it
        ddp_kwargs.setdefault("forward_sync_buffers", False)
    device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    # Sequence-parallel replicated parameters (norms, row biases) get their tp sum and dp mean from comm's one
    # coalesced all-reduce over the tp x dp world (comm.grad_sync): DDP must neither bucket nor broadcast them
    # (it would read their grads before that sum lands), so they are synced across dp here, once.
    ignored = comm.replicated_parameters(model)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in ignored:
                dist.broadcast(params[name], dist.get_global_rank(group, 0), group=group)
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=group, bucket_cap_mb=bucket_mb,
                                  **ddp_kwargs)  # fmt: skip
    ddp.register_comm_hook(mesh, grad_sync_hook)
    return ddp


def make_optimizer(params, mesh: Mesh, optimizer_class: type[torch.optim.Optimizer], zero: bool = False,
                   **kwargs) -> torch.optim.Optimizer:  # fmt: skip
    """optimizer_class(params, **kwargs), or with `zero` and dp > 1 torch's ZeroRedundancyOptimizer over
    mesh.dp_group (ZeRO-1: each dp rank holds the optimizer state of ~1/dp of `params` and steps only those,
    then broadcasts them to its dp peers). ZeRO's state_dict() needs consolidate_state_dict(to=...) on every
    dp rank first; its load_state_dict() takes a full state dict and keeps this rank's part."""
    if zero and mesh.dp_size > 1:
        group = _dp_group_or_error(mesh, "make_optimizer(zero=True)")
        # Imported here: torch.distributed.optim scripts its functional optimizers on import (~1 s).
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=group, **kwargs)
    return optimizer_class(params, **kwargs)


def is_zero(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt` partitions its state over dp ranks (torch's ZeroRedundancyOptimizer)."""
    return hasattr(opt, "consolidate_state_dict")  # duck-typed: no torch.distributed.optim import for a plain one


def optimizer_states(opt: torch.optim.Optimizer) -> dict[torch.Tensor, dict]:
    """param -> its full optimizer state (e.g. Adam's step, exp_avg, exp_avg_sq), for every parameter that has
    one. With ZeRO this is collective over the dp group (call it on every dp rank): the partitions are
    consolidated to dp rank 0, which gets every parameter's state; the other dp ranks get {}."""
    if not is_zero(opt):
        return {p: opt.state[p] for group in opt.param_groups for p in group["params"] if opt.state.get(p)}
    opt.consolidate_state_dict(to=0)  # `to` is the rank inside the dp group
    if dist.get_rank(opt.process_group) != 0:
        return {}
    by_index = opt.state_dict()["state"]  # indexed as torch does: the parameters in param_groups order
    params = [p for group in opt.param_groups for p in group["params"]]
    return {params[i]: state for i, state in by_index.items() if state}


def load_optimizer_states(opt: torch.optim.Optimizer, states: dict[torch.Tensor, dict]) -> None:
    """Give every parameter in `states` (param -> full state, as optimizer_states returns) that state; with ZeRO
    each dp rank keeps the states of its own partition (pass the same full `states` on every dp rank)."""
    if not is_zero(opt):
        for p, state in states.items():
            opt.state[p] = state
        return
    index, groups = {}, []
    for group in opt.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": []})
        for p in group["params"]:
            groups[-1]["params"].append(index.setdefault(p, len(index)))
    opt.load_state_dict({"state": {index[p]: state for p, state in states.items()}, "param_groups": groups})


def average_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    """grad <- mean over the dp ranks of grad, for every parameter that has one: one blocking flat all-reduce
    (tag "dp_grad_sync") after backward.

    A fallback for code that cannot wrap its model: prefer `wrap_ddp`, whose bucketed all-reduce overlaps with
    backward (what `shardwise train` and the planner assume)."""
    if mesh.dp_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_(flat, mesh, DP_TAG, "bwd", group="dp")
    flat /= mesh.dp_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
