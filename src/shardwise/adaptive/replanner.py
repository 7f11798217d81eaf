"""The re-planner: every `every` steps, predict each candidate layout's step time with cost model v2 at the live
link estimates, and decide whether switching pays.

A switch happens when ALL of:
  - the best candidate is predicted faster than the current layout by more than `margin` (relative),
  - the predicted gain repays the switch's cost within `horizon_steps`,
  - the same target won `patience` consecutive decisions (a noisy estimate that crosses over once does not count),
  - the last switch is at least `cooldown_steps` ago, and the target is not banned (below).
Measurement wins over the model: after a switch from A to B, once B has `every` measured steps, if B's median
step is slower than A's last measured median by more than `margin`, the re-planner switches back to A and bans
B until a link estimate moves by more than `relearn` (a factor) from what it was at the verdict.

Deterministic given its inputs (floats in, floats out, candidates in their given order), so every rank reaches
the same decision from agreed estimates (LinkEstimator.agree). Feed it every step's measured time (decide() on
every step; it only re-plans on steps that are multiples of `every`).

Live hardware (live_hardware): the calibration's fits hold per-(class, op, group size) alpha/beta that override
the Hardware's Links, so the live estimate is substituted as a RATIO: each class's calibrated betas (and Link
bandwidth) are scaled by calibrated/live link rate, the calibrated rate being the calibration's pure-transfer
fit in the estimator's units (bandwidth.reference_link). Latencies stay calibrated (the lab shapes rates, and
latency estimates from a training run's few sizes are the noisiest part).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..planner.costmodel import predict
from ..planner.hardware import Hardware, Link
from ..planner.topology import PLACEMENTS, span
from ..planner.workload import ModelConfig, heads_feasible
from .bandwidth import LinkEstimate, reference_link

REBUILD_S = 0.5  # fixed part of a switch's cost: building the new model, DDP and optimizer (CPU, small models)


@dataclass
class Decision:
    step: int
    current: str  # layout names (Layout.name)
    switch_to: str | None
    predicted_s: dict  # layout name -> predicted step seconds at the live estimates
    measured_s: float | None  # current layout's measured median step (its last `every` steps)
    switch_cost_s: float  # of the best candidate (0 when it is the current one)
    gain_s_per_step: float  # predicted current - predicted best (> 0: the best is faster)
    reason: str
    estimates: dict = field(default_factory=dict)  # klass -> LinkEstimate as dict
    best: str | None = None  # the predicted best candidate
    streak: int = 0  # consecutive decisions the best has qualified (patience)

    def to_dict(self) -> dict:
        return asdict(self)


def live_hardware(hw: Hardware, estimates: dict[str, LinkEstimate]) -> Hardware:
    """`hw` with each estimated class's link rate replaced by the live one (see the module doc). 'mixed' rings
    run at their inter hops, so a 'mixed' estimate scales the inter fits when there is no 'inter' estimate."""
    scales = {}
    for klass in ("intra", "mixed", "inter"):  # inter last: a direct inter estimate wins over a mixed one
        est = estimates.get(klass)
        ref = reference_link(hw, klass)
        if est is None or ref is None or est.bandwidth_Bps <= 0:
            continue
        scales["inter" if klass == "mixed" else klass] = ref.bandwidth / est.bandwidth_Bps
    if not scales:
        return hw
    fits = {}
    for key, f in hw.fits.items():
        s = scales.get(key[0])
        if s is None:
            fits[key] = f
            continue
        fits[key] = {**f, "beta_s_per_byte": f["beta_s_per_byte"] * s}
        if f.get("transfer_fit"):
            tf = f["transfer_fit"]
            fits[key]["transfer_fit"] = {**tf, "beta_s_per_byte": tf["beta_s_per_byte"] * s}
    intra = Link(hw.intra.latency_s, hw.intra.bandwidth / scales.get("intra", 1.0))
    inter = Link(hw.inter.latency_s, hw.inter.bandwidth / scales.get("inter", 1.0))
    return replace(hw, fits=fits, intra=intra, inter=inter)


def model_switch_cost(cfg: ModelConfig, hw: Hardware, current, target, rebuild_s: float = REBUILD_S) -> float:
    """Seconds to switch `current` -> `target` (layouts): the parameters and both Adam moments all-gathered
    within the old tp group (each rank then keeps its new slice), the new DDP's broadcast of the parameters over
    the new dp group (as an all-gather of them), plus `rebuild_s`."""
    e = cfg.dtype_bytes
    state = cfg.params * (e + 8)  # parameters at the training dtype + exp_avg, exp_avg_sq in fp32
    cost = rebuild_s
    if current.tp > 1:
        cost += hw.collective("all_gather", state, span(current.tp, current.dp, current.placement, "tp",
                                                        hw.devices_per_node))  # fmt: skip
    if target.dp > 1:
        cost += hw.collective("all_gather", cfg.params * e / target.tp, span(target.tp, target.dp, target.placement,
                                                                             "dp", hw.devices_per_node))  # fmt: skip
    return cost


class Replanner:
    """candidates: layouts (objects with tp, dp, placement, sequence_parallel and .name, e.g. live_reshard.Layout) on
    `devices` ranks; global_batch: sequences per step (fixed across layouts). switch_cost_s: None (the model:
    model_switch_cost, replaced by the mean of measured switches once record_switch() has any), a float (seconds),
    or a callable (current, target, live Hardware) -> seconds. cooldown_steps: default 2 * every * patience."""

    def __init__(self, model_cfg: ModelConfig, hw: Hardware, devices: int, candidates: list, global_batch: int, *,
                 every: int = 10, horizon_steps: int = 100, margin: float = 0.15, patience: int = 2,
                 bucket_mb: float = 25.0, switch_cost_s: Callable | float | None = None,
                 cooldown_steps: int | None = None, relearn: float = 1.5, settle_steps: int = 2):  # fmt: skip
        if not candidates:
            raise ValueError("Replanner needs at least one candidate layout (e.g. the planner's top picks)")
        if every < 1 or patience < 1 or horizon_steps < 1 or margin < 0:
            raise ValueError(f"every={every}, patience={patience}, horizon_steps={horizon_steps} must be >= 1 "
                             f"and margin={margin} >= 0")  # fmt: skip
        names = set()
        for c in candidates:
            if c.tp * c.dp != devices:
                raise ValueError(f"candidate {c.name}: tp*dp = {c.tp * c.dp} != devices={devices}: give layouts "
                                 f"of the same world")  # fmt: skip
            if c.placement not in PLACEMENTS:
                raise ValueError(f"candidate {c.name}: placement must be one of {PLACEMENTS}")
            if c.tp > model_cfg.heads or not heads_feasible(model_cfg, c.tp)[0]:
                raise ValueError(f"candidate {c.name}: tp={c.tp} cannot split {model_cfg.heads} heads")
            if c.name in names:
                raise ValueError(f"candidate {c.name} given twice")
            names.add(c.name)
        self.cfg, self.hw, self.devices, self.candidates = model_cfg, hw, devices, list(candidates)
        self.global_batch, self.every, self.horizon_steps = global_batch, every, horizon_steps
        self.margin, self.patience, self.bucket_mb, self.relearn = margin, patience, bucket_mb, relearn
        self.switch_cost_s, self.settle_steps = switch_cost_s, settle_steps
        self.cooldown_steps = cooldown_steps if cooldown_steps is not None else 2 * every * patience
        self._measured: dict[str, deque] = {}  # layout name -> last `every` measured step seconds
        self._settling = 0  # measurements still to skip at the current layout (right after a switch)
        self._last_layout: str | None = None
        self._streak: tuple[str | None, int] = (None, 0)
        self._last_switch: dict | None = None  # {"step", "from", "to", "back": bool}
        self._banned: dict[str, dict[str, float]] = {}  # layout name -> link rates at the verdict
        self._switch_costs: list[float] = []
        self.decisions: list[Decision] = []
        self._best_measured: dict[str, float] = {}  # layout name -> fastest median it ever measured
        self._arrival_median: float | None = None  # the current visit's first median
        self._probe_streak = 0

    # ---- inputs ----------------------------------------------------------------------------------------
    def record_switch(self, seconds: float) -> None:
        """A measured switch's wall time (e.g. max over ranks of Resharded.seconds): replaces the modelled cost."""
        self._switch_costs.append(float(seconds))

    def _record_measurement(self, current, measured_step_s: float | None) -> None:
        if current.name != self._last_layout:  # arrived (switch, or first call): skip the warm-up steps
            self._last_layout, self._settling = current.name, self.settle_steps
            self._measured[current.name] = deque(maxlen=self.every)  # this visit's steps only
            self._arrival_median = None
        if measured_step_s is None:
            return
        if self._settling > 0:
            self._settling -= 1
            return
        self._measured.setdefault(current.name, deque(maxlen=self.every)).append(float(measured_step_s))

    def _median(self, name: str) -> float | None:
        m = self._measured.get(name)
        return statistics.median(m) if m and len(m) >= self.every else None

    # ---- the model -------------------------------------------------------------------------------------
    def predict_all(self, hw: Hardware) -> dict[str, float]:
        out = {}
        for c in self.candidates:
            try:
                p = predict(self.cfg, hw, c.tp, self.devices, c.sequence_parallel, self.global_batch,
                            placement=c.placement, recompute="none", overlap=False, zero=False,
                            bucket_mb=self.bucket_mb)  # fmt: skip
                out[c.name] = p.step_s if p.fits else math.inf
            except ValueError:  # e.g. sequence parallelism with seq not divisible by tp
                out[c.name] = math.inf
        return out

    def switch_cost(self, current, target, hw: Hardware) -> float:
        if current.name == target.name:
            return 0.0
        if callable(self.switch_cost_s):
            return float(self.switch_cost_s(current, target, hw))
        if self.switch_cost_s is not None:
            return float(self.switch_cost_s)
        if self._switch_costs:
            return statistics.fmean(self._switch_costs)
        return model_switch_cost(self.cfg, hw, current, target)

    # ---- deciding --------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def decide(self, step: int, current, estimates: dict[str, LinkEstimate],
               measured_step_s: float | None = None) -> Decision:  # fmt: skip
        """The decision at `step` (after it ran) for the model now at `current`; measured_step_s: that step's
        time (same on every rank: e.g. the max over ranks). switch_to is None unless the caller should switch."""
        self._record_measurement(current, measured_step_s)
        est = {k: v.to_dict() for k, v in sorted(estimates.items())}
        measured = self._median(current.name)
        if not self.due(step):
            return Decision(step, current.name, None, {}, measured, 0.0, 0.0, "not due", est)
        if measured is not None:  # what _probe remembers, kept at every due decision (cool-down included)
            self._best_measured[current.name] = min(measured, self._best_measured.get(current.name, math.inf))
            if self._arrival_median is None:
                self._arrival_median = measured
        hw = live_hardware(self.hw, estimates)
        predicted = self.predict_all(hw)
        best = min(self.candidates, key=lambda c: predicted[c.name])  # first of equals: the given order
        cur_pred = predicted.get(current.name, math.inf)
        gain = cur_pred - predicted[best.name] if math.isfinite(cur_pred) else math.inf
        cost = self.switch_cost(current, best, hw)

        def decision(switch_to, reason, streak=0):
            d = Decision(step, current.name, switch_to, predicted, measured, cost, gain, reason, est, best.name, streak)
            self.decisions.append(d)
            return d

        rates = {k: v.bandwidth_Bps for k, v in estimates.items()}
        for name in [n for n, at in self._banned.items() if self._moved(at, rates)]:
            del self._banned[name]  # the link changed since the verdict: let the model try again
        back = self._switch_back(current, step, rates)
        if back is not None:
            return decision(*back)
        last = self._last_switch
        if last is not None and step - last["step"] < self.cooldown_steps:
            self._streak = (None, 0)
            return decision(None, f"cool-down after the switch at step {last['step']} "
                                  f"(until step {last['step'] + self.cooldown_steps})")  # fmt: skip
        probe = self._probe(current, measured, cost_of=lambda target: self.switch_cost(current, target, hw))
        if probe is not None:
            target, reason = probe
            self._streak = (None, 0)
            self._last_switch = {"step": step, "from": current.name, "to": target, "back": False,
                                 "from_measured": measured}  # fmt: skip
            return decision(target, reason)
        if best.name == current.name:
            self._streak = (None, 0)
            return decision(None, "current layout is the predicted best")
        why = None
        if best.name in self._banned:
            why = f"{best.name} measured slower than the layout it replaced (banned until a link rate moves)"
        elif not gain > self.margin * cur_pred:
            why = f"predicted gain {gain / cur_pred:.1%} <= margin {self.margin:.0%}"
        elif not gain * self.horizon_steps > cost:
            why = f"switch cost {cost:.3g} s not repaid in {self.horizon_steps} steps at {gain:.3g} s/step"
        if why is not None:
            self._streak = (None, 0)
            return decision(None, why)
        if measured_step_s is not None and measured is None:
            # measurement wins only with a baseline: the switch-back compares against this layout's median
            self._streak = (None, 0)
            return decision(None, f"measuring {current.name} first ({self.every} steps) before switching")
        streak = self._streak[1] + 1 if self._streak[0] == best.name else 1
        self._streak = (best.name, streak)
        if streak < self.patience:
            return decision(None, f"{best.name} qualifies ({streak}/{self.patience} decisions)", streak)
        self._streak = (None, 0)
        self._last_switch = {"step": step, "from": current.name, "to": best.name, "back": False,
                             "from_measured": self._median(current.name)}  # fmt: skip
        return decision(best.name, f"predicted {gain / cur_pred:.1%} faster ({gain:.3g} s/step repays "
                                   f"{cost:.3g} s in {cost / gain:.0f} steps)", streak)  # fmt: skip

    def _probe(self, current, measured: float | None, cost_of: Callable):
        """(target, reason) to try a layout again on measurement alone, else None.

        Why: a layout's own collectives cannot always resolve a fast link. With tp across nodes the messages are
        small and a blocking gloo call's time is mostly waiting for the slower rank, so when the link comes back
        to its full rate the estimate stays low (measured in the lab: 12-290 Mbit/s on an unshaped link) and the
        model keeps the layout chosen for the slow link. The step time does see it: when the current layout's
        median falls below 1/`relearn` of its median on arrival, the link got faster, and a layout that MEASURED
        faster (its fastest median ever) than the current one does now is tried again, if the gain repays the
        switch within the horizon. It counts as a switch: if the layout measures slower than the one it left,
        _switch_back returns and holds it off."""
        if measured is None or self._arrival_median is None:
            return None
        faster = measured * self.relearn < self._arrival_median
        options = [
            (t, name)
            for name, t in self._best_measured.items()
            if name != current.name and name not in self._banned and t * (1 + self.margin) < measured
        ]
        if not faster or not options:
            self._probe_streak = 0
            return None
        best_t, name = min(options)
        target = next(c for c in self.candidates if c.name == name)
        if (measured - best_t) * self.horizon_steps <= cost_of(target):
            self._probe_streak = 0
            return None
        self._probe_streak += 1
        if self._probe_streak < self.patience:
            return None
        self._probe_streak = 0
        return name, (f"the link got faster: {current.name} now {measured * 1e3:.0f} ms/step, "
                      f"{self._arrival_median * 1e3:.0f} on arrival; {name} measured {best_t * 1e3:.0f} ms/step "
                      f"when the link was fast: trying it again (measurement decides)")  # fmt: skip

    def _switch_back(self, current, step: int, rates: dict):
        """(switch_to, reason) when the layout we switched to measures slower than the one we left, else None."""
        last = self._last_switch
        if last is None or last["back"] or last["to"] != current.name:
            return None
        now, before = self._median(current.name), last["from_measured"]
        if now is None or before is None:
            return None
        if now <= before * (1 + self.margin):
            last["back"] = True  # confirmed by measurement: no more comparisons for this switch
            return None
        self._banned[current.name] = rates
        self._last_switch = {"step": step, "from": current.name, "to": last["from"], "back": True,
                             "from_measured": now}  # fmt: skip
        self._streak = (None, 0)
        return last["from"], (f"switch back: {current.name} measured {now * 1e3:.1f} ms/step vs {before * 1e3:.1f} "
                              f"at {last['from']} (> margin {self.margin:.0%}); {current.name} held off")  # fmt: skip

    def _moved(self, at: dict, rates: dict) -> bool:
        for k, r in rates.items():
            if k in at and at[k] > 0 and r > 0 and max(r / at[k], at[k] / r) > self.relearn:
                return True
        return False


__all__ = ["REBUILD_S", "Decision", "Replanner", "live_hardware", "model_switch_cost"]
