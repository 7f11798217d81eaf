"""The training loop's side of adaptive tensor parallelism: watch the links, re-plan, reshard.

    ctl = AdaptiveController(gpt_cfg, seq=64, global_batch=16, hw=hw, layout=Layout(1, 2), ...)
    ctl.attach(model, optimizer)                   # the live objects of the current layout
    for step in ...:
        ... one training step, timed: dt ...
        switched = ctl.after_step(step + 1, dt)    # a step boundary: grads zeroed
        if switched is not None:                   # a new model/ddp/optimizer/mesh: use them from here on
            model, ddp, optimizer, mesh = switched.model, switched.ddp, switched.optimizer, switched.mesh

Every collective training already runs reaches the LinkEstimator (comm observer), so the bandwidth estimate
costs no extra traffic. Every `every` steps all ranks agree on the estimates and on the measured step time (one
small all-reduce: the slowest rank's view), the Replanner decides (deterministic, so every rank decides alike),
and a switch reshards the training state in memory (live_reshard.reshard_training). Decisions and switches go to
`log` (a callable taking a JSON-able dict; rank 0 writes them as JSON lines).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import comm
from ..live_reshard import Layout, reshard_training
from ..planner.topology import span
from ..planner.workload import gpt_config
from .bandwidth import LinkEstimator
from .replanner import Replanner


def devices_per_node(world: int) -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE (the lab's nodes too), else every rank on one node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def candidate_layouts(world: int, heads: int, global_batch: int, seq: int,
                      sequence_parallel: bool = False) -> list[Layout]:  # fmt: skip
    """Every layout of `world` ranks a training step can take: tp dividing the heads, dp dividing the batch,
    both placements where both groups exist (they differ only then), SP on only when asked (and seq divides)."""
    out = []
    for tp in (t for t in range(1, world + 1) if world % t == 0):
        dp = world // tp
        if heads % tp or global_batch % dp:
            continue
        placements = ("tp-inner", "dp-inner") if tp > 1 and dp > 1 else ("tp-inner",)
        for placement in placements:
            out.append(Layout(tp, dp, placement, False))
            if sequence_parallel and tp > 1 and seq % tp == 0:
                out.append(Layout(tp, dp, placement, True))
    return out


class AdaptiveController:
    """Re-plan from live link estimates every `every` steps; reshard when the Replanner says so.

    gpt_cfg: the model's GPTConfig; seq, global_batch: tokens per sequence, sequences per step (over all dp);
    hw: planner Hardware (a calibration of this job); layout: the current Layout; candidates: layouts to
    consider (default: candidate_layouts); make_optimizer(params, mesh): the optimizer for a new layout.
    Replanner options (horizon_steps, margin, patience) pass through `replanner_kwargs`."""

    def __init__(self, gpt_cfg, *, seq: int, global_batch: int, hw, layout: Layout,
                 make_optimizer: Callable, bucket_mb: float = 25.0, every: int = 10,
                 candidates: list[Layout] | None = None, log: Callable[[dict], None] | None = None,
                 window: int | None = None, **replanner_kwargs):  # fmt: skip
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.world = world
        self.per_node = devices_per_node(world)
        self.layout, self.every, self.bucket_mb = layout, every, bucket_mb
        self.make_optimizer = make_optimizer
        self.log = log or (lambda record: None)
        self.candidates = candidates or candidate_layouts(world, gpt_cfg.num_heads, global_batch, seq)
        if layout not in self.candidates:
            self.candidates = [layout, *self.candidates]
        micro = global_batch // layout.dp
        self.replanner = Replanner(gpt_config(gpt_cfg, seq, micro), hw, world, self.candidates, global_batch,
                                   every=every, bucket_mb=bucket_mb, **replanner_kwargs)  # fmt: skip
        self.estimator = LinkEstimator(**({"window": window} if window else {}), prior=hw)
        self._spans(layout)
        self.step_times: list[float] = []  # this layout's measured step seconds since the last decision/switch
        self.switches: list[dict] = []
        self.model = self.optimizer = None
        comm.add_observer(self.estimator)  # the estimator is an observer: collective events only

    def _spans(self, layout: Layout) -> None:
        self.estimator.set_layout(span(layout.tp, layout.dp, layout.placement, "tp", self.per_node),
                                  span(layout.tp, layout.dp, layout.placement, "dp", self.per_node))  # fmt: skip

    def attach(self, model, optimizer) -> None:
        """The GPT and its optimizer a switch moves (reshard_training builds the new DDP and mesh)."""
        self.model, self.optimizer = model, optimizer

    def close(self) -> None:
        comm.remove_observer(self.estimator)

    def _agreed(self, values: list[float]) -> list[float]:
        """Element-wise max over ranks (a parallel step ends with its slowest rank): every rank gets the same
        numbers, so the Replanner, deterministic, decides alike everywhere."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def after_step(self, step: int, step_seconds: float):
        """Call at every step boundary (grads zeroed) with the step's wall time on this rank; returns the
        Resharded state when this boundary switched layouts, else None."""
        self.step_times.append(step_seconds)
        if step % self.every:
            return None
        # one all-reduce per `every` steps for the step times, one for the estimates: the decision's only traffic
        times = self._agreed(self.step_times[-self.every :])
        self.step_times = []
        estimates = self.estimator.agree()
        first = step - len(times) + 1
        for s, t in zip(range(first, step + 1), times, strict=True):
            decision = self.replanner.decide(s, self.layout, estimates, t)  # all but the last only record t
        # the agreed step times too: with the estimates they are all decide() saw, so a log replays exactly
        self.log({"kind": "decision", **decision.to_dict(), "step_times": times})
        if decision.switch_to is None:
            return None
        target = next(c for c in self.candidates if c.name == decision.switch_to)
        began = time.perf_counter()
        resharded = reshard_training(self.model, self.optimizer, target, make_optimizer=self.make_optimizer,
                                     bucket_mb=self.bucket_mb)  # fmt: skip
        seconds = self._agreed([time.perf_counter() - began])[0]
        switch = {"kind": "switch", "step": step, "from": self.layout.name, "to": target.name,
                  "seconds": seconds, "bytes_moved": resharded.bytes_moved,
                  "predicted_s": decision.predicted_s.get(target.name)}  # fmt: skip
        self.switches.append(switch)
        self.log(switch)
        self.replanner.record_switch(seconds)
        self.layout = target
        self.step_times = []
        # 'inter' and 'mixed' are two views of one node link; the class the new layout does not cross would keep
        # its last value for ever (measured: a stale 22 Mbit/s 'inter' outvoted a fresh 3.7 Gbit/s 'mixed' and
        # cost a round trip), so estimates restart from the new layout's own traffic (calibration meanwhile)
        self.estimator.reset()
        self._spans(target)
        self.attach(resharded.model, resharded.optimizer)
        return resharded


__all__ = ["AdaptiveController", "candidate_layouts", "devices_per_node"]
