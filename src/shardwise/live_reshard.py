"""Live resharding: the same training state (weights, Adam moments, RNG streams) moved to another layout (tp, dp,
placement, sequence parallelism) of the same world, through collectives instead of a checkpoint on disk.

    layout = Layout.parse("4:1")                  # or Layout(tp=4, dp=1), or "tp4dp1-tp-inner"
    new = reshard_training(model, opt, layout, make_optimizer=lambda params, mesh: torch.optim.Adam(params, lr=1e-3))
    model, ddp, opt = new.model, new.ddp, new.optimizer   # the old ones are left as they were: drop them

Each tensor (a parameter and its exp_avg / exp_avg_sq) is all-gathered within its OLD tp group (sharding.gather_full)
and each rank keeps the rows its NEW ShardSpec names (sharding.take), one full tensor at a time. The vocabulary's
padding rows (which depend on tp) are dropped and the new ones are zero, weights and moments alike, exactly as a
checkpoint load at the new layout leaves them (checkpoint.reader: "zeros past valid"). The result is the state a
run that saved a checkpoint at this step and loaded it at `layout` would hold, so its next losses are the same.

RNG: torch's default (CPU and CUDA) generators are left untouched, as a checkpoint load on the same world restores
them to what they were at the save; shardwise.rng's tp stream (per-tp-rank dropout masks) is re-seeded as
rng.manual_seed(torch.initial_seed(), new_mesh) would seed it for the rank's NEW tp rank, as a restarted process
would (checkpoints do not hold that stream).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from . import rng
from .data_parallel import is_zero, load_optimizer_states, optimizer_states, wrap_ddp
from .heads import head_layout
from .mesh import PLACEMENTS, Mesh, use_grid
from .nn import GPT
from .sharding import ShardSpec, gather_full, shard_spec, take

_NAME = re.compile(r"^tp(\d+)dp(\d+)-(tp-inner|dp-inner)(\+sp)?$")
_SP_WORDS = {"1": True, "sp": True, "on": True, "true": True, "0": False, "off": False, "false": False, "": False}
_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Layout:
    """How the world's ranks run the model: tp x dp grid, which dimension's ranks are adjacent, and SP."""

    tp: int
    dp: int
    placement: str = "tp-inner"  # mesh.PLACEMENTS
    sequence_parallel: bool = False

    def __post_init__(self):
        if not isinstance(self.tp, int) or not isinstance(self.dp, int) or self.tp < 1 or self.dp < 1:
            raise ValueError(f"a layout needs positive integers tp and dp, got tp={self.tp!r}, dp={self.dp!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"layout placement must be one of {PLACEMENTS}, got {self.placement!r}")

    @property
    def name(self) -> str:
        """ "tp2dp1-tp-inner", "tp2dp2-dp-inner+sp" (bench/lab_step.py's names)."""
        return f"tp{self.tp}dp{self.dp}-{self.placement}{'+sp' if self.sequence_parallel else ''}"

    @staticmethod
    def parse(text: str) -> Layout:
        """ "tp:dp[:placement[:sp]]" (sp: sp|on|1 or 0|off) or a name such as "tp2dp2-dp-inner+sp"."""
        text = text.strip()
        named = _NAME.match(text)
        if named:
            return Layout(int(named[1]), int(named[2]), named[3], named[4] is not None)
        parts = text.split(":")
        try:
            if not 2 <= len(parts) <= 4 or parts[3:] and parts[3].lower() not in _SP_WORDS:
                raise ValueError
            return Layout(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "tp-inner",
                          len(parts) > 3 and _SP_WORDS[parts[3].lower()])  # fmt: skip
        except ValueError:
            raise ValueError(
                f"layout {text!r}: use tp:dp[:placement[:sp]] (e.g. 2:2:dp-inner:sp, placement one of {PLACEMENTS}, "
                "sp one of sp/1/0) or a name such as tp2dp2-dp-inner+sp"
            ) from None

    @staticmethod
    def of(model: GPT) -> Layout:
        """The layout `model` runs at (its mesh and config)."""
        mesh = model.mesh
        return Layout(mesh.tp_size, mesh.dp_size, mesh.placement, bool(model.config.sequence_parallel))

    def to_dict(self) -> dict:
        """{"tp", "dp", "placement", "sequence_parallel"}: Layout(**d) gives it back."""
        return asdict(self)


def switch_mesh(layout: Layout, timeout_s: float | None = None) -> Mesh:
    """The mesh of `layout` on the SAME world (collective over the world; mesh.use_grid). Process groups are built
    once per (tp, dp, placement) and cached, so switching back and forth never creates new groups; the result
    becomes the default mesh and what init_mesh() returns afterwards."""
    return use_grid(layout.tp, layout.dp, placement=layout.placement, timeout_s=timeout_s)


@dataclass
class Resharded:
    """What reshard_training hands back: the training state at `layout`, to use from the next step on."""

    model: GPT
    ddp: torch.nn.Module  # data_parallel.wrap_ddp(model): the model itself when dp == 1
    optimizer: torch.optim.Optimizer
    mesh: Mesh
    layout: Layout
    seconds: float  # wall time of the switch on this rank
    bytes_moved: int  # bytes this rank sent: (group size - 1) x its shard per all-gather, x its tensor per broadcast


def _check_request(model: GPT, layout: Layout) -> None:
    """Raise on every rank (before any state moves) unless all ranks ask for the same layout, at a step boundary,
    and the layout fits the world and the model."""
    wrong = None
    if not isinstance(model, GPT):
        wrong = f"reshard_training moves a shardwise GPT (ddp.module), got {type(model).__name__}"
    elif not isinstance(layout, Layout):
        wrong = f"layout must be a shardwise.live_reshard.Layout (Layout.parse('2:2')), got {layout!r}"
    pending = wrong is None and any(p.grad is not None and bool(p.grad.any()) for p in model.parameters())
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = (layout if wrong is None else None, pending, wrong)
    asked = [mine]
    if world > 1:  # every rank learns every rank's request first, so a bad one fails all of them, none waits
        asked = [None] * world
        dist.all_gather_object(asked, mine)
    errors = [(r, w) for r, (_, _, w) in enumerate(asked) if w]
    if errors:
        raise TypeError("; ".join(f"rank {r}: {w}" for r, w in errors))
    asked = [(a, p) for a, p, _ in asked]
    if len({a for a, _ in asked}) > 1:
        detail = ", ".join(f"rank {r}: {a.name}" for r, (a, _) in enumerate(asked))
        raise ValueError(f"ranks asked to reshard to different layouts ({detail}); pass the same layout on every rank")
    if any(p for _, p in asked):
        ranks = [r for r, (_, p) in enumerate(asked) if p]
        raise ValueError(
            f"reshard_training runs at a step boundary, but ranks {ranks} hold unapplied gradients: call "
            "optimizer.step() and optimizer.zero_grad() first"
        )
    if layout.tp * layout.dp != world:
        raise ValueError(
            f"layout {layout.name} needs tp * dp = {layout.tp * layout.dp} ranks but the world has {world}; "
            f"reshard within the same world (tp * dp = {world})"
        )
    cfg = model.config
    try:
        head_layout(cfg.num_heads, cfg.num_kv_heads, layout.tp, 0)
    except ValueError as exc:
        raise ValueError(f"layout {layout.name} does not fit the model: {exc}") from None
    if cfg.vocab_size < layout.tp:
        raise ValueError(f"layout {layout.name}: vocab_size={cfg.vocab_size} cannot be split over tp={layout.tp}")


def _moved(tensor: torch.Tensor, old: ShardSpec | None, new: ShardSpec | None, old_mesh: Mesh,
           same_grid: bool) -> torch.Tensor:  # fmt: skip
    """This rank's NEW local rows of the full tensor whose OLD local rows are `tensor` (collective over the old tp
    group unless the grid is unchanged). Padding past `valid` is dropped and the new padding is zero."""
    if same_grid and old == new:
        return tensor.detach().clone()
    full = gather_full(tensor, old, old_mesh)  # the one full tensor alive at a time
    if old is not None and old.valid is not None:
        full = full.narrow(old.dim, 0, old.valid)
    if new is not None and new.valid is not None and full.shape[new.dim] < new.full:
        pad = list(full.shape)
        pad[new.dim] = new.full - full.shape[new.dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=new.dim)
    return take(full, new).clone()


def _sent_bytes(tensor: torch.Tensor, spec: ShardSpec | None, mesh: Mesh, same: bool) -> int:
    if same or spec is None or mesh.tp_size == 1:
        return 0
    return tensor.numel() * tensor.element_size() * (mesh.tp_size - 1)


def _old_states(model: GPT, optimizer) -> tuple[list[dict | None], int]:
    """Per parameter (model order): {"step", "exp_avg", "exp_avg_sq"} of this rank's shard, or None (no state yet);
    with ZeRO each is broadcast from dp rank 0 after the consolidation, so every rank holds all (bytes it sent)."""
    params = list(model.parameters())
    states = optimizer_states(optimizer)  # ZeRO: collective over dp, everything lands on dp rank 0
    if not is_zero(optimizer):
        return [_adam_state(states.get(p)) for p in params], 0
    mesh, sent = model.mesh, 0
    steps = [None if states.get(p) is None else float(states[p]["step"]) for p in params]
    box = [steps]
    dist.broadcast_object_list(box, group=mesh.dp_group, group_src=0)
    out = []
    for p, step in zip(params, box[0], strict=True):
        if step is None:
            out.append(None)
            continue
        state = {"step": torch.tensor(step)}
        for kind in _MOMENTS:
            value = states[p][kind] if mesh.dp_rank == 0 else torch.empty_like(p)
            dist.broadcast(value, group=mesh.dp_group, group_src=0)
            sent += value.numel() * value.element_size() * (mesh.dp_size - 1) if mesh.dp_rank == 0 else 0
            state[kind] = value
        out.append(state)
    return out, sent


def _adam_state(state: dict | None) -> dict | None:
    if not state:
        return None
    missing = [k for k in ("step", *_MOMENTS) if k not in state]
    if missing:
        raise ValueError(f"reshard_training moves Adam's state (step, exp_avg, exp_avg_sq); this optimizer's lacks "
                         f"{missing}: use torch.optim.Adam or AdamW")  # fmt: skip
    return state


def reshard_training(model: GPT, optimizer: torch.optim.Optimizer, layout: Layout, *,
                     make_optimizer: Callable[..., torch.optim.Optimizer], bucket_mb: float = 25.0,
                     timeout_s: float | None = None) -> Resharded:  # fmt: skip
    """At a step boundary (gradients applied and zeroed): the same training state at `layout` on the same world.
    Collective over the world: every rank calls it with the same layout.

    model: the GPT (ddp.module), at its mesh; optimizer: its Adam/AdamW (or ZeroRedundancyOptimizer over Adam,
    whose partitions are consolidated and moved too). make_optimizer(params, mesh) -> the new optimizer (e.g.
    data_parallel.make_optimizer with the run's class, zero flag and hyper-parameters); its state is then set to
    the moved exp_avg, exp_avg_sq and step. bucket_mb: the new DDP's bucket size (MiB). timeout_s: for new
    process groups (None: the world's).
    The new GPT is built with the model's config, sequence_parallel=layout.sequence_parallel, on
    switch_mesh(layout) (which becomes the default mesh), and wrapped with data_parallel.wrap_ddp. Weights and
    moments move by an all-gather within the old tp group per tensor (one full tensor alive at a time); an
    unchanged grid with only SP toggled copies locally. The old model and optimizer are left as they were.
    Bad input (a layout that does not fill the world or fit the heads, ranks disagreeing, unapplied gradients)
    raises the same ValueError on every rank before anything changes.
    """
    started = time.perf_counter()
    _check_request(model, layout)
    old_mesh = model.mesh
    old_states, sent = _old_states(model, optimizer)
    new_mesh = switch_mesh(layout, timeout_s)
    same_grid = new_mesh.tp_group is old_mesh.tp_group and new_mesh.tp_rank == old_mesh.tp_rank
    cuda = [new_mesh.device.index or 0] if new_mesh.device.type == "cuda" else []
    # Building draws random initial weights (overwritten below): keep torch's generators where they were, as a
    # checkpoint load (which restores them) would leave them.
    with torch.random.fork_rng(devices=cuda):
        new_model = GPT(replace(model.config, sequence_parallel=layout.sequence_parallel), new_mesh)
        rng.manual_seed(torch.initial_seed(), new_mesh)  # the tp stream for the new tp rank (see the module doc)
    old_named, new_named = dict(model.named_parameters()), dict(new_model.named_parameters())
    if list(old_named) != list(new_named):
        raise RuntimeError("the GPT rebuilt at the new layout has other parameters than the old one")
    new_states = {}
    with torch.no_grad():
        for old, new, state in zip(old_named.values(), new_named.values(), old_states, strict=True):
            old_spec, new_spec = shard_spec(old), shard_spec(new)
            new.copy_(_moved(old, old_spec, new_spec, old_mesh, same_grid))
            sent += _sent_bytes(old, old_spec, old_mesh, same_grid)
            if state is None:
                continue
            moved = {"step": state["step"].detach().clone()}
            for kind in _MOMENTS:
                moved[kind] = _moved(state[kind], old_spec, new_spec, old_mesh, same_grid)
                sent += _sent_bytes(state[kind], old_spec, old_mesh, same_grid)
            new_states[new] = moved
    ddp = wrap_ddp(new_model, new_mesh, bucket_mb=bucket_mb)
    new_optimizer = make_optimizer(new_model.parameters(), new_mesh)
    load_optimizer_states(new_optimizer, new_states)  # with ZeRO each dp rank keeps its own partition's
    return Resharded(new_model, ddp, new_optimizer, new_mesh, layout, time.perf_counter() - started, sent)
