"""The rank grid: tp x dp process groups, built from torchrun's environment or our launcher's.

Placement (torchrun gives each node consecutive global ranks, so it decides which groups cross nodes):
    "tp-inner" (default)  global rank = dp_rank * tp + tp_rank: tp ranks adjacent, so the chatty
                          tensor-parallel groups stay inside a node and the dp groups span nodes
    "dp-inner"            global rank = tp_rank * dp + dp_rank: dp ranks adjacent, tp groups span nodes
                          (pays when the per-step dp gradient all-reduce outweighs TP's activations)
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

_default_mesh: Mesh | None = None  # what `mesh=None` means
_built_mesh: Mesh | None = None  # the mesh init_mesh() made: a second call returns it instead of new groups
# Every grid built on this world, by (tp, dp, placement): switching back to one (use_grid) reuses its groups,
# since each new_group is a collective over the whole world and holds handles until destroyed.
_grids: dict[tuple[int, int, str], Mesh] = {}
_joins = 0  # process groups this process joined: a fresh key prefix each time, so stale keys never count
DEFAULT_TIMEOUT_S = 300.0  # rendezvous and collectives, when neither timeout_s nor $SHARDWISE_TIMEOUT_S says
PLACEMENTS = ("tp-inner", "dp-inner")  # which dimension's ranks are adjacent (see the module doc)


@dataclass(frozen=True)
class Mesh:
    """One rank's view of the grid. `tp_group`/`dp_group` are None when that dimension has size 1
    and no process group is needed (e.g. a dense single-process reference)."""

    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), compare=False)
    # Ranks agree on every collective before issuing it (comm.checks; also SHARDWISE_DEBUG_COLLECTIVES=1).
    debug: bool = field(default=False, compare=False)
    placement: str = "tp-inner"  # one of PLACEMENTS: how (tp_rank, dp_rank) map to the global rank

    @property
    def rank(self) -> int:
        """The global rank of (tp_rank, dp_rank) under this mesh's placement."""
        return global_rank(self.tp_rank, self.dp_rank, self.tp_size, self.dp_size, self.placement)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    @staticmethod
    def single(device: str | torch.device = "cpu") -> Mesh:
        """A tp=1, dp=1 mesh needing no process group: the dense reference runs on it."""
        return Mesh(tp_size=1, tp_rank=0, dp_size=1, dp_rank=0, device=torch.device(device))


def global_rank(tp_rank: int, dp_rank: int, tp: int, dp: int, placement: str = "tp-inner") -> int:
    """The global rank holding grid cell (tp_rank, dp_rank) of a tp x dp world under `placement`."""
    _check_placement(placement)
    return dp_rank * tp + tp_rank if placement == "tp-inner" else tp_rank * dp + dp_rank


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(
            f"placement must be 'tp-inner' (tp ranks adjacent: tp groups inside a node) or 'dp-inner' (dp ranks "
            f"adjacent: tp groups span nodes), got {placement!r}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"{name} is not set: init_mesh() must run inside a rank started by torchrun or "
            "shardwise.launch(); for a single-process dense model use Mesh.single()"
        )
    return int(value)


def init_mesh(tp: int, dp: int = 1, *, placement: str = "tp-inner", backend: str | None = None,
              timeout_s: float | None = None, debug: bool = False) -> Mesh:  # fmt: skip
    """Join the process group (if not joined yet) and build the tp x dp groups.

    Every rank must call this with the same tp, dp and placement: process-group creation is collective.
    `placement`: "tp-inner" (global rank = dp_rank * tp + tp_rank) or "dp-inner" (tp_rank * dp + dp_rank);
    see the module doc. The result becomes the default mesh for layers built with `mesh=None`. Called again
    with the same tp, dp and placement it returns the same mesh (no new process groups: each costs a
    collective and handles); with others it raises, since two meshes over one world would leave layers on
    mismatched groups.
    `backend` and `timeout_s` apply when this call joins the process group: `timeout_s` bounds the rendezvous
    (a rank that never calls init_mesh is named after it) and every collective; None means $SHARDWISE_TIMEOUT_S
    (shardwise.launch sets it, default 120 s), else 300 s. `debug=True`: ranks agree on every collective
    before issuing it and a mismatch raises naming both call sites (comm.checks; as SHARDWISE_DEBUG_COLLECTIVES=1).
    """
    global _default_mesh, _built_mesh
    _check_request(tp, dp, placement)
    if _built_mesh is not None and not dist.is_initialized():
        _built_mesh = None  # the process group was destroyed under us: its mesh is gone with it
        _grids.clear()
    if _built_mesh is not None:
        built = _built_mesh
        if (built.tp_size, built.dp_size, built.placement) != (tp, dp, placement):
            raise ValueError(
                f"init_mesh(tp={built.tp_size}, dp={built.dp_size}, placement={built.placement!r}) already built "
                f"this process's mesh; init_mesh(tp={tp}, dp={dp}, placement={placement!r}) would build a second "
                "one: pass the existing mesh "
                "(shardwise.get_mesh()), or call shardwise.mesh.destroy_mesh() on every rank first"
            )
        if backend is not None and backend != dist.get_backend():
            raise ValueError(
                f"the process group already uses backend {dist.get_backend()!r}, not {backend!r}: "
                "call torch.distributed.destroy_process_group() on every rank first to change it"
            )
        if debug and not built.debug:
            built = _built_mesh = replace(built, debug=True)
        _default_mesh = built
        return built
    if timeout_s is None:
        timeout_s = float(os.environ.get("SHARDWISE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE")
        rank = _env_int("RANK")
        _check_grid(tp, dp, world_size)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend,
            store=_rendezvous(rank, world_size, timeout_s),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # A script that returns with the group alive (the usual torchrun script) can die in gloo's
        # threads at interpreter exit ("terminate called without an active exception"): tear down first.
        atexit.register(_destroy_process_group)
    _agree(tp, dp, placement)
    mesh = _grids.get((tp, dp, placement)) or _build_grid(tp, dp, placement, debug)
    _default_mesh = _built_mesh = mesh
    return mesh


def use_grid(tp: int, dp: int = 1, *, placement: str = "tp-inner", timeout_s: float | None = None) -> Mesh:
    """Switch this process's mesh to the tp x dp grid under `placement`, on the world already joined (joins it
    through init_mesh if not yet). Collective over the world: every rank calls it with the same grid. A grid built
    before (by init_mesh or here) comes back with its own process groups, so switching back and forth creates
    none; a new grid's groups get `timeout_s` (None: the world's). The result becomes the default mesh and what
    init_mesh(tp, dp, placement=...) returns from then on. Layers built on the previous mesh keep using its groups:
    rebuild them on this one (shardwise.live_reshard moves a training state across)."""
    global _default_mesh, _built_mesh
    _check_request(tp, dp, placement)
    if not dist.is_initialized():
        return init_mesh(tp, dp, placement=placement, timeout_s=timeout_s)
    if _built_mesh is not None:
        _grids.setdefault((_built_mesh.tp_size, _built_mesh.dp_size, _built_mesh.placement), _built_mesh)
    _agree(tp, dp, placement)
    debug = _built_mesh is not None and _built_mesh.debug
    mesh = _grids.get((tp, dp, placement))
    if mesh is None:
        mesh = _build_grid(tp, dp, placement, debug, timeout_s)
    elif mesh.debug != debug:
        mesh = _grids[(tp, dp, placement)] = replace(mesh, debug=debug)
    _default_mesh = _built_mesh = mesh
    return mesh


def _check_request(tp, dp, placement: str) -> None:
    if not isinstance(tp, int) or not isinstance(dp, int) or tp < 1 or dp < 1:
        raise ValueError(f"tp and dp must be positive integers, got tp={tp!r}, dp={dp!r}")
    _check_placement(placement)


def _agree(tp: int, dp: int, placement: str) -> None:
    """Raise on every rank unless every rank asks for the same grid and it fills the world (creating groups
    for different grids would hang)."""
    world_size = dist.get_world_size()
    if world_size > 1:
        asked = [None] * world_size
        dist.all_gather_object(asked, (tp, dp, placement))
        if len(set(asked)) > 1:
            detail = ", ".join(f"rank {r}: tp={t} dp={d} {p}" for r, (t, d, p) in enumerate(asked))
            raise ValueError(
                f"ranks asked for different meshes ({detail}); pass the same tp, dp and placement on every rank"
            )
    _check_grid(tp, dp, world_size)


def _build_grid(tp: int, dp: int, placement: str, debug: bool, timeout_s: float | None = None) -> Mesh:
    """This rank's Mesh of a new tp x dp grid, its groups created (collective over the world), and cached."""
    rank = dist.get_rank()
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    tp_group = dp_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for dp_index in range(dp):
        ranks = [global_rank(t, dp_index, tp, dp, placement) for t in range(tp)]
        group = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
        if rank in ranks:
            tp_group = group
    for tp_index in range(tp):
        ranks = [global_rank(tp_index, d, tp, dp, placement) for d in range(dp)]
        group = dist.new_group(ranks, timeout=timeout) if dp > 1 else None
        if rank in ranks:
            dp_group = group

    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    tp_rank, dp_rank = (rank % tp, rank // tp) if placement == "tp-inner" else (rank // dp, rank % dp)
    mesh = Mesh(
        tp_size=tp,
        tp_rank=tp_rank,
        dp_size=dp,
        dp_rank=dp_rank,
        tp_group=tp_group,
        dp_group=dp_group,
        device=device,
        debug=debug,
        placement=placement,
    )
    assert mesh.rank == rank  # the two formulas above and global_rank agree
    _grids[(tp, dp, placement)] = mesh
    return mesh


def _rendezvous(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The store the process group is built on, after every rank has checked in (torch's env:// rendezvous
    only says "1/2 clients joined" after its timeout: this names the ranks that never came). Rank 0 hosts
    it at MASTER_ADDR:MASTER_PORT, as torch's own would; under torchrun the agent hosts it."""
    global _joins
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent, timeout=timeout,
                              wait_for_workers=False, multi_tenant=not agent)  # fmt: skip
    except RuntimeError as exc:
        host_rank = "the torchrun agent" if agent else "rank 0"
        raise RuntimeError(
            f"rank {rank} of {world_size} could not reach the rendezvous store at {host}:{port} within "
            f"{timeout_s:g} s: {host_rank}, which hosts it, never called init_mesh (or MASTER_ADDR/MASTER_PORT "
            "differ between ranks)"
        ) from exc
    _joins += 1
    prefix = f"shardwise/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_joins}/"
    keys = [f"{prefix}joined/{r}" for r in range(world_size)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timeout)
    except RuntimeError:
        joined = [r for r in range(world_size) if store.check([keys[r]])]
        missing = [r for r in range(world_size) if r not in joined]
        if not missing:  # all came just as we gave up
            return dist.PrefixStore(prefix, store)
        who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}"
        raise RuntimeError(
            f"{who} of {world_size} never called init_mesh within {timeout_s:g} s (joined: "
            f"{', '.join(map(str, joined))}); every rank must call init_mesh (raise timeout_s if it is just slow)"
        ) from None
    return dist.PrefixStore(prefix, store)


def destroy_mesh() -> None:
    """Forget the mesh init_mesh() built (and every grid use_grid() switched through) and destroy their tp/dp
    groups (the world group stays), so the next init_mesh() may ask for another grid. Collective in spirit:
    call it on every rank."""
    global _default_mesh, _built_mesh
    mesh, _built_mesh = _built_mesh, None
    meshes = [m for m in (mesh, *_grids.values()) if m is not None]
    _grids.clear()
    if any(_default_mesh is m for m in meshes):
        _default_mesh = None
    if not meshes or not dist.is_initialized():
        return
    groups = {id(g): g for m in meshes for g in (m.tp_group, m.dp_group) if g is not None}
    for group in groups.values():
        dist.destroy_process_group(group)


def _destroy_process_group() -> None:
    global _default_mesh, _built_mesh
    _default_mesh = _built_mesh = None
    _grids.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_grid(tp: int, dp: int, world_size: int) -> None:
    if tp * dp != world_size:
        if world_size % tp:
            raise ValueError(
                f"tp={tp} does not divide the world size {world_size}; "
                f"use tp in {{{', '.join(map(str, _divisors(world_size)))}}}"
            )
        raise ValueError(
            f"tp * dp = {tp} * {dp} = {tp * dp} but the world size is {world_size}; "
            f"use dp={world_size // tp} with tp={tp}"
        )


def get_mesh() -> Mesh:
    """The default mesh: the last one init_mesh() built, else a single-process tp=1 mesh."""
    if _default_mesh is not None:
        return _default_mesh
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "the process group is initialised but no mesh was built: call shardwise.init_mesh(tp=...) "
            "before building layers, or pass mesh= explicitly"
        )
    return Mesh.single()


def set_default_mesh(mesh: Mesh | None) -> None:
    global _default_mesh
    _default_mesh = mesh


def resolve(mesh: Mesh | None) -> Mesh:
    """The mesh a layer is built with: `mesh`, or the default; checked against its process group so a
    mesh that claims another size than its group fails here, not as a hang inside a collective."""
    if mesh is None:
        return get_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a shardwise.Mesh (from init_mesh or Mesh.single()), got {type(mesh).__name__}")
    if mesh.tp_size > 1:
        if mesh.tp_group is None or not dist.is_initialized():
            raise ValueError(f"a mesh with tp={mesh.tp_size} needs its process group: build it with init_mesh()")
        group_size = dist.get_world_size(mesh.tp_group)
        if group_size != mesh.tp_size:
            raise ValueError(
                f"the mesh says tp={mesh.tp_size} but its tp group has {group_size} ranks; "
                f"build layers with the mesh init_mesh(tp={group_size}) returned"
            )
    return mesh
