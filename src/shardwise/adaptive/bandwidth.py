"""Runtime bandwidth estimation: a running alpha-beta link estimate per link class from the collectives training
already runs (the profiler's CollectiveEvents; no extra traffic).

Every observed collective time is an UPPER bound on its pure transfer time: a blocking call also waits for the
slowest rank to arrive (skew), an async one (DDP's "dp_grad_sync") is seen done only when some thread looks, and
its `inflight_s` (issue to seen-done) is the bound used. So the samples' bandwidths are lower bounds, and the
estimate is a windowed LOWER ENVELOPE of the times (as BBR's windowed max-bandwidth filter): per link class and
situation bin (op, group size, flows, message size in powers of 2), the `quantile` (default 0.1: about the
second-lowest of 16) of the last `window` samples. A low quantile instead of the min: one unusually fast sample
(a token bucket's burst) does not set the estimate alone. The window forgets: a drop in rate shows once
(1 - quantile) of a bin's window is new samples, a rise after quantile of it.

Units. Samples are normalised to the ring model hardware.py uses (T = steps * latency + fraction * bytes /
bandwidth per hop; an inter-node hop shares its node link with the other concurrent groups' flows), so one
estimate covers every op and group size on the class:
    alpha_s          latency per ring step (s)
    beta_s_per_byte  seconds per byte through the link at one flow (1 / bandwidth_Bps)
    bandwidth_Bps    the link's rate for one flow, one direction (bytes/s): for 'inter' the node link's rate
With envelope points at message sizes 4x apart or more, alpha and beta are fitted (relative least squares, both
>= 0); else alpha is the prior's (calibrated) latency and only beta is estimated.
rel_uncertainty: the bandwidth lies between bandwidth_Bps * (1 - rel_uncertainty) (what the MEDIAN sample of
the window implies: typical skew included) and bandwidth_Bps (the envelope); 0 when every sample agrees.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..comm.events import CollectiveEvent
from ..data_parallel import DP_TAG
from ..planner.hardware import GroupSpan, Hardware, Link, link_from_fit, ring_steps

CLASSES = ("intra", "inter", "mixed")
MIN_BETA_S_PER_BYTE = 1e-13  # 10 TB/s: a calibrated beta below it is a clamped fit, not a link
_ABSENT = -1e18  # agree(): a rank without an estimate of a class contributes this to the MAX all-reduce


@dataclass(frozen=True)
class LinkEstimate:
    """One link class's live estimate (units in the module doc)."""

    klass: str
    alpha_s: float  # latency per ring step
    beta_s_per_byte: float  # 1 / bandwidth_Bps
    bandwidth_Bps: float  # one flow, one direction
    rel_uncertainty: float  # bandwidth in [bandwidth_Bps * (1 - u), bandwidth_Bps]
    samples: int  # samples in the window(s) the estimate was made from
    fitted_alpha: bool = False  # alpha fitted from several message sizes (else the prior's)

    def link(self) -> Link:
        """As hardware.Link (one flow at full rate): Link.time(op, nbytes, m) is the envelope's prediction."""
        return Link(self.alpha_s, self.bandwidth_Bps)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> LinkEstimate:
        return LinkEstimate(**d)


def reference_link(hw: Hardware, klass: str) -> Link | None:
    """The calibrated link of `klass` in the estimator's units (per-step latency, rate at one flow), from the
    calibration's pure-transfer fit when it has one ("transfer_fit": timed after the last rank arrived, skew-free
    like the envelope), else its fit; all_reduce at the smallest group size preferred. 'mixed' rings' slowest
    hops are inter hops: 'mixed' is 'inter'. None when the calibration measured no such class."""
    klass = "inter" if klass == "mixed" else klass
    fits = sorted(((op != "all_reduce", m, op), f) for (c, op, m), f in hw.fits.items() if c == klass)
    # a fit whose beta the calibration clamped to ~0 (its sizes could not resolve the link: seen in a quick
    # calibration of an unshaped lab link) is no reference: scaling by it made every intra collective take hours
    fits = [(key, f, f.get("transfer_fit") or f) for key, f in fits]
    fits = [item for item in fits if item[2].get("beta_s_per_byte", 0.0) > MIN_BETA_S_PER_BYTE]
    if not fits:
        return None
    (_, m, op), f, transfer = fits[0]
    link = link_from_fit(op, transfer, m)
    if klass == "inter":  # the calibration's concurrent groups shared the node link: one flow gets all of it
        link = Link(link.latency_s, link.bandwidth * f.get("concurrent_groups", 1))
    return link


@dataclass(frozen=True)
class _Sample:
    seconds: float
    steps: int  # latency steps of the ring
    load: float  # bytes through the busiest hop, times the flows sharing its link: seconds = load / rate
    index: int  # the class's sample counter when seen (staleness)


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class LinkEstimator:
    """Observer of comm.events.CollectiveEvent (comm.add_observer(est) / remove_observer, or est.observe(e)): a
    running alpha-beta estimate per link class ('intra', 'inter', 'mixed') with its uncertainty.

    Which class an event belongs to comes from the layout: set_layout(tp_span, dp_span) (topology.span), or
    `layout_spans`, a callable () -> (tp_span, dp_span) asked at every event (e.g. reading the live mesh).
    Tag "dp_grad_sync" (DDP's hook) -> the dp group's class, every other tag -> the tp group's. Events whose
    group size is not the span's (some other group) or whose span crosses no link are ignored (`ignored`).

    window: samples kept per bin; quantile: the envelope's quantile; prior: calibrated Hardware giving the
    latency when sizes cannot fit it and the node-link flows sharing (node_link_flows); stale_after: a bin not
    refreshed in this many samples of its class (an old layout's traffic) is left out of the estimate."""

    def __init__(self, layout_spans: Callable[[], tuple[GroupSpan, GroupSpan]] | None = None, window: int = 16,
                 prior: Hardware | None = None, *, quantile: float = 0.1, stale_after: int | None = None,
                 min_samples: int = 3):  # fmt: skip
        if window < 2:
            raise ValueError(f"window={window}: keep at least 2 samples per bin (16 is the default)")
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"quantile={quantile} must be in [0, 1): 0 is the min, 0.1 the default")
        self.window, self.quantile, self.prior, self.min_samples = window, quantile, prior, min_samples
        self.stale_after = stale_after if stale_after is not None else 8 * window
        self._layout_spans = layout_spans
        self._spans: tuple[GroupSpan, GroupSpan] | None = None
        self._bins: dict[str, dict[tuple, deque]] = {k: {} for k in CLASSES}
        self._count = dict.fromkeys(CLASSES, 0)
        self._unresolved: list[tuple[CollectiveEvent, GroupSpan]] = []
        self.ignored = 0

    # ---- feeding ---------------------------------------------------------------------------------------
    def set_layout(self, tp_span: GroupSpan, dp_span: GroupSpan) -> None:
        """Which link class (and how many flows) the tp and dp groups of the current layout cross."""
        self._spans = (tp_span, dp_span)

    def span_of(self, event: CollectiveEvent) -> GroupSpan | None:
        """The span `event` ran over, None when it belongs to no known group or crosses no link."""
        spans = self._layout_spans() if self._layout_spans is not None else self._spans
        if spans is None:
            return None
        s = spans[1] if event.tag == DP_TAG else spans[0]
        if s.klass not in CLASSES or s.size != event.group_size or s.size < 2:
            return None
        return s

    def __call__(self, event) -> None:  # the observer protocol: compute events and starts are not ours
        if isinstance(event, CollectiveEvent):
            self.observe(event)

    def observe(self, event: CollectiveEvent) -> None:
        s = self.span_of(event)
        if s is None or event.nbytes <= 0:
            self.ignored += 1
            return
        if not event.async_op and event.seconds is None:  # CUDA: read at estimates(), not now (no sync here)
            self._unresolved.append((event, s))
            return
        self._add(event, s)

    def _add(self, event: CollectiveEvent, s: GroupSpan) -> None:
        seconds = event.inflight_s if event.async_op else event.seconds
        if seconds is None or seconds <= 0:
            self.ignored += 1
            return
        steps, fraction = ring_steps(event.op, s.size)
        flows = 1.0
        if s.klass != "intra":  # concurrent flows share the node link beyond the NICs a node has
            flows = max(1.0, s.flows / (self.prior.node_link_flows if self.prior else 1))
        load = fraction * event.nbytes * flows
        key = (event.op, s.size, s.flows, round(math.log2(event.nbytes)))
        self._count[s.klass] += 1
        bin_ = self._bins[s.klass].setdefault(key, deque(maxlen=self.window))
        bin_.append(_Sample(seconds, steps, load, self._count[s.klass]))

    def _resolve(self) -> None:
        pending, self._unresolved = self._unresolved, []
        for event, s in pending:
            self._add(event.resolve(), s)

    # ---- estimating ------------------------------------------------------------------------------------
    def estimates(self) -> dict[str, LinkEstimate]:
        """klass -> LinkEstimate for every class with at least `min_samples` fresh samples."""
        self._resolve()
        out = {}
        for klass in CLASSES:
            est = self._estimate(klass)
            if est is not None:
                out[klass] = est
        return out

    def _estimate(self, klass: str) -> LinkEstimate | None:
        fresh = self._count[klass] - self.stale_after
        bins = [[x for x in b if x.index > fresh] for b in self._bins[klass].values()]
        bins = [b for b in bins if b]
        n = sum(len(b) for b in bins)
        if n < self.min_samples:
            return None
        # one point per bin: the envelope time (and, for the uncertainty, the median time)
        points = [(b[0].steps, b[0].load, _quantile([x.seconds for x in b], self.quantile),
                   _quantile([x.seconds for x in b], 0.5), len(b)) for b in bins]  # fmt: skip
        prior = reference_link(self.prior, klass) if self.prior is not None else None
        alpha, beta, fitted = self._fit(points, prior.latency_s if prior else 0.0)
        _, beta_median, _ = self._fit([(s, x, med, med, c) for s, x, _, med, c in points], alpha, force=True)
        uncertainty = max(0.0, 1.0 - beta / beta_median) if beta_median > 0 else 0.0
        return LinkEstimate(klass, alpha, beta, 1.0 / beta, uncertainty, n, fitted)

    @staticmethod
    def _fit(points: list, prior_alpha: float, force: bool = False) -> tuple[float, float, bool]:
        """(alpha, beta, fitted) for t = steps * alpha + load * beta over the envelope points; alpha fitted when
        loads span 4x or more (and not `force`d to prior_alpha), by least squares on relative error."""
        loads = [x for _, x, _, _, _ in points]
        if not force and len(points) >= 2 and max(loads) >= 4 * min(loads):
            # minimise sum w (steps a + x b - t)^2 / t^2: the 2x2 normal equations
            saa = sab = sbb = sat = sbt = 0.0
            for s, x, t, _, c in points:
                w = c / (t * t)
                saa, sab, sbb = saa + w * s * s, sab + w * s * x, sbb + w * x * x
                sat, sbt = sat + w * s * t, sbt + w * x * t
            det = saa * sbb - sab * sab
            if det > 0:
                a, b = (sat * sbb - sab * sbt) / det, (saa * sbt - sab * sat) / det
                if a < 0:  # latency not resolvable from these sizes: bandwidth alone
                    a, b = 0.0, sbt / sbb
                if b > 0:
                    return a, b, True
        # beta from each point with the prior's latency, combined by count; latency-bound points (t below the
        # latency) say little about bandwidth: their transfer part is floored at 10% of t
        total = sum(c for *_, c in points)
        beta = sum(c * max(t - s * prior_alpha, 0.1 * t) / x for s, x, t, _, c in points) / total
        return prior_alpha, beta, False

    def agree(self, group=None) -> dict[str, LinkEstimate]:
        """Every rank of `group` (default: the world) ends with IDENTICAL estimates: one MAX all-reduce. Max of
        alpha and beta is the slowest rank's view, and the right one: each rank's envelope is a valid lower bound
        on the transfer time (and a ring runs at its slowest hop), so the largest of them is the tightest valid
        bound; a mean would average a skew-inflated view into ranks that saw the link clean. Max uncertainty,
        min samples; a class any rank estimates is in the result (from the ranks that have it)."""
        import torch
        import torch.distributed as dist

        local = self.estimates()
        fields = 5
        vec = torch.full((len(CLASSES) * fields,), _ABSENT, dtype=torch.float64)
        for i, klass in enumerate(CLASSES):
            e = local.get(klass)
            if e is not None:
                vec[i * fields : (i + 1) * fields] = torch.tensor(
                    [e.alpha_s, e.beta_s_per_byte, e.rel_uncertainty, -float(e.samples), float(e.fitted_alpha)],
                    dtype=torch.float64,
                )
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
        out = {}
        for i, klass in enumerate(CLASSES):
            alpha, beta, unc, neg_samples, fitted = vec[i * fields : (i + 1) * fields].tolist()
            if beta <= _ABSENT / 2:
                continue
            out[klass] = LinkEstimate(klass, alpha, beta, 1.0 / beta, unc, int(-neg_samples), fitted > 0.5)
        return out

    def reset(self) -> None:
        """Forget every sample (e.g. when the fabric is known to have changed)."""
        for klass in CLASSES:
            self._bins[klass].clear()
        self._unresolved.clear()


__all__ = ["CLASSES", "LinkEstimate", "LinkEstimator", "reference_link"]
