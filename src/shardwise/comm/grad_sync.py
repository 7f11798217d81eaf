"""Replicated parameters' gradient sums, coalesced: ONE all-reduce per backward, issued asynchronously.

Under sequence parallelism the norms' weights/biases and the row-parallel layers' biases are whole on every tp
rank but each rank applies them to other tokens, so each rank's grad is a partial sum. Summing each of them by
its own small all-reduce inside backward (copy_params_to_tp: 4 per transformer block) costs a collective's
latency per parameter; here they are summed together:

    forward   `replicated_params(params, mesh, tag)` returns the params untouched (no autograd node) and
              records them with the mesh's ReplicaGradSync.
    backward  a hook on each parameter takes its incoming grad (this rank's partial sum) and lets a zero be
              accumulated in its place; when the last recorded one has arrived, the grads are flattened into
              one buffer whose all-reduce (tag "sp_grad_sync", phase "bwd") is issued async, flying while the
              rest of backward (the layers below the first norm, the embedding) computes.
    end       a callback queued on autograd's engine waits for it and adds each slice to its param.grad.

So the grads are final when `loss.backward()` returns; nothing else to call. Accumulation over micro-batches
works (the sum is added to .grad); any order of forwards and backwards works (a backward whose parameters
were not all recorded since the last one issues its all-reduce at its end instead of early).

With dp > 1 the same all-reduce runs over the whole tp x dp world and is divided by dp: the tp sum and the
dp mean in one collective. The dp gradient sync must then leave these parameters alone: `wrap_ddp` tells DDP to
ignore them (see `replicated_parameters`); `average_gradients` averages values that are already equal.

Only `loss.backward()` (or torch.autograd.backward) is supported: torch.autograd.grad would return the zeros.
Under torch.compile the layers keep the traceable per-parameter copy_params_to_tp instead: its all-reduce is in the
graph, so the compiled graph also sets a flag (a tensor it mutates, so the mutation runs on every call) that tells
the hooks, which still fire on these parameters at runtime, to pass those already-summed grads through; an eager
forward clears it again.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from ..mesh import Mesh
from .collectives import copy_params_to_tp
from .events import run_collective

__all__ = ["SP_GRAD_TAG", "ReplicaGradSync", "replicated_parameters", "replicated_params"]

SP_GRAD_TAG = "sp_grad_sync"  # the tag observers see on the coalesced all-reduce
# True while the last forward to use replicated params was a compiled one (its graph summed their grads already).
_graph_summed = torch.zeros((), dtype=torch.bool)


class ReplicaGradSync:
    """The coalesced grad sum of one mesh's replicated parameters. Every parameter it ever recorded has an index: its
    recording order, the same on every rank (every rank runs the same forward), which orders the buffer."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.params: list[weakref.ref] = []  # layout of the flat buffer
        self.index: dict[int, int] = {}  # id(param) -> position in params
        self.expected: set[int] = set()  # recorded since the last backward finished
        self.arrived: dict[int, torch.Tensor] = {}  # id(param) -> this backward's incoming grad
        self.pending = None  # the in-flight all-reduce (comm.Pending), if issued early
        self.queued = False

    def record(self, param: torch.Tensor) -> None:
        key = id(param)
        if key not in self.index or self.params[self.index[key]]() is not param:
            self.index[key] = len(self.params)
            self.params.append(weakref.ref(param))
            if _owner_of(param) is None:  # one hook per parameter, whichever mesh's sync owns it now
                param.register_hook(_arrive_hook(weakref.ref(param)))
            _owner[id(param)] = (weakref.ref(param), self)
        self.expected.add(key)

    def arrive(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """param's incoming grad (before accumulation) -> what autograd accumulates instead (zeros)."""
        key = id(param)
        if key in self.arrived:  # a second backward pass through the same graph before the end: add up
            self.arrived[key] = self.arrived[key] + grad
        else:
            self.arrived[key] = grad
        if not self.queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self.queued = True
        if self.pending is None and self.expected and self.expected <= self.arrived.keys():
            self.pending = self._issue(async_op=True)  # the last one: fly while backward goes on
        return torch.zeros_like(grad)

    def _issue(self, async_op: bool):
        # The buffer: the parameters recorded since the last backward and any other that got a grad, in recording
        # order (the same on every rank); one recorded but without a grad this time is zeros there.
        keys = sorted(self.expected | self.arrived.keys(), key=lambda k: self.index[k])
        live = [self.params[self.index[k]]() for k in keys]
        self.arrived_layout = [p for p in live if p is not None]
        pieces = []
        for p in self.arrived_layout:
            g = self.arrived.get(id(p))
            pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(-1))
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        mesh = self.mesh
        if mesh.dp_size > 1:  # fold the dp mean in: one all-reduce over the tp x dp world (init_mesh fills it)
            group, size = None, mesh.tp_size * mesh.dp_size
        else:
            group, size = mesh.tp_group, mesh.tp_size
        issue = lambda a: dist.all_reduce(flat, group=group, async_op=a)  # noqa: E731
        return run_collective("all_reduce", flat.numel(), flat, flat, size, SP_GRAD_TAG, "bwd", issue, async_op,
                              group=group, debug=mesh.debug)  # fmt: skip

    def finish(self) -> None:
        """End of backward: wait for the sum (issuing it now if it was not issued early), add it to the grads."""
        try:
            if self.arrived:
                flat = self.pending.wait() if self.pending is not None else self._issue(async_op=False)
                if self.mesh.dp_size > 1:
                    flat /= self.mesh.dp_size
                offset = 0
                for p in self.arrived_layout:
                    total = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
                    offset += p.numel()
                    if p.grad is None:
                        p.grad = total.clone()
                    else:
                        p.grad.add_(total)
        finally:
            self.arrived, self.expected, self.pending, self.queued = {}, set(), None, False


# id(param) -> (weakref to it, the ReplicaGradSync that sums it); by id: tensors compare elementwise
_owner: dict[int, tuple[weakref.ref, ReplicaGradSync]] = {}


def _owner_of(param: torch.Tensor) -> ReplicaGradSync | None:
    entry = _owner.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


_syncs: dict[tuple, ReplicaGradSync] = {}  # the mesh's (tp, dp) group ids -> its sync (groups outlive meshes)


def _arrive_hook(ref: weakref.ref):
    def hook(grad):
        param = ref()
        sync = _owner_of(param) if param is not None else None
        return grad if sync is None or bool(_graph_summed) else sync.arrive(param, grad)

    return hook


def replicated_params(params: list[torch.Tensor], mesh: Mesh, tag: str = "replicated_params") -> tuple:
    """Replicated parameters used on different tokens per tp rank (sequence-parallel norms, row biases): the
    params themselves, their grads summed over tp (and averaged over dp) by the mesh's one coalesced all-reduce
    at the end of backward. Under torch.compile: copy_params_to_tp (a traceable autograd function)."""
    if mesh.tp_size == 1 or not torch.is_grad_enabled():
        return tuple(params)
    if torch.compiler.is_compiling():
        if mesh.dp_size > 1:  # wrap_ddp leaves these params out of DDP, and the traced sum covers tp only
            raise NotImplementedError(
                "sequence parallelism with dp > 1 under torch.compile: the replicated norm/bias grads would not be "
                "averaged over dp (their dp replicas would drift apart); run this model eagerly, or with dp=1"
            )
        _graph_summed.fill_(True)
        return copy_params_to_tp(params, mesh, tag)
    _graph_summed.fill_(False)
    key = (id(mesh.tp_group), id(mesh.dp_group))
    sync = _syncs.get(key)
    if sync is None or sync.mesh.tp_group is not mesh.tp_group or sync.mesh.dp_group is not mesh.dp_group:
        sync = _syncs[key] = ReplicaGradSync(mesh)
    for p in params:
        if p.requires_grad:
            sync.record(p)
    return tuple(params)


def replicated_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the model's parameters whose grads the coalesced sync sums (modules with a
    `replicated_grad_parameters()` method: sequence-parallel norms and row-parallel layers at tp > 1)."""
    names = []
    for prefix, module in model.named_modules():
        method = getattr(module, "replicated_grad_parameters", None)
        if method is None:
            continue
        own = {id(p): n for n, p in module.named_parameters(recurse=False)}
        names += [f"{prefix}.{own[id(p)]}" if prefix else own[id(p)] for p in method() if id(p) in own]
    return names
