"""Where the time goes: every collective (op, bytes, time) and every parallel layer's compute time,
per step and per layer, from the observer hooks in comm.events. R = comm time / compute time.

    with shardwise.profile(model) as prof:
        for step in range(n):
            ...forward, backward, optimizer...
            prof.step()
    print(prof.summary())

How it times (comm/events.py): a collective is timed by wall clock on CPU; on CUDA by a pair of CUDA
events recorded on the stream around it, read when the step ends (prof.step()), so the device is not
synchronised after every collective. A layer's compute time is wall clock between its boundaries, and on
CUDA each boundary synchronises the device: that serialises overlap across layer boundaries (a measurement
mode, not a production one). Off, it costs one list check per call.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from dataclasses import asdict

import torch

from . import comm
from .comm import CollectiveEvent, ComputeEvent


def name_layers(model: torch.nn.Module, prefix: str = "") -> list[str]:
    """Tag every shardwise layer with its qualified name, so events say which layer issued them.
    Returns the tags in module order."""
    tags = []
    for name, module in model.named_modules():
        if hasattr(module, "tag"):
            module.tag = f"{prefix}{name}" if name else (prefix.rstrip(".") or type(module).__name__)
            tags.append(module.tag)
    return tags


class Profile:
    def __init__(self, model: torch.nn.Module | None = None):
        self._order = name_layers(model) if model is not None else []
        self.collectives: list[CollectiveEvent] = []
        self.computes: list[ComputeEvent] = []
        self.steps: list[dict] = []
        self._step_start = None
        self._mark = (0, 0)

    def __enter__(self) -> Profile:
        comm.add_observer(self._record)
        self._step_start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        comm.remove_observer(self._record)

    @contextlib.contextmanager
    def paused(self):
        """Run something (a reference model, a check) without recording it."""
        comm.remove_observer(self._record)
        try:
            yield
        finally:
            comm.add_observer(self._record)

    def _record(self, event) -> None:
        (self.collectives if isinstance(event, CollectiveEvent) else self.computes).append(event)

    def begin(self) -> None:
        """Start a step's clock now (what ran since the last step() is left out of every step)."""
        self._step_start = time.perf_counter()
        self._mark = (len(self.collectives), len(self.computes))

    def step(self, **extra) -> dict:
        """Close a step: its wall time and the comm/compute inside it. Extra fields are kept. R is None when the
        step reported nothing at all (a compiled model: its collectives and layers run inside the graph, where
        no host clock reaches), not 0: nothing observed is not "no communication"."""
        now = time.perf_counter()
        first_collective, first_compute = self._mark
        # CUDA-timed events get their times now, once per step, not after every collective.
        self.collectives[first_collective:] = [e.resolve() for e in self.collectives[first_collective:]]
        collectives = self.collectives[first_collective:]
        computes = self.computes[first_compute:]
        wall = now - self._step_start
        comm_s = sum(e.seconds for e in collectives)
        record = {
            "step": len(self.steps),
            "wall_ms": wall * 1e3,
            "comm_ms": comm_s * 1e3,
            "compute_ms": (wall - comm_s) * 1e3,
            "layer_compute_ms": sum(e.seconds for e in computes) * 1e3,
            "collectives": len(collectives),
            "computes": len(computes),
            "comm_bytes": sum(e.nbytes for e in collectives),
            "R": comm_s / max(wall - comm_s, 1e-12) if collectives or computes else None,
            **extra,
        }
        self.steps.append(record)
        self._mark = (len(self.collectives), len(self.computes))
        self._step_start = time.perf_counter()
        return record

    def layers(self, skip_steps: int = 0) -> list[dict]:
        """Per layer, averaged per step over the steps after `skip_steps` (warm-up): its collectives,
        bytes, comm time, compute time and R = comm / compute."""
        n_steps = max(1, len(self.steps) - skip_steps)
        rows: dict[str, dict] = defaultdict(lambda: {"ops": defaultdict(int), "bytes": 0, "comm_s": 0.0,
                                                     "compute_s": 0.0})  # fmt: skip
        start_c, start_k = self._offsets(skip_steps)
        for e in self.collectives[start_c:]:
            row = rows[e.tag]
            row["ops"][f"{e.phase} {e.op}"] += 1
            row["bytes"] += e.nbytes
            row["comm_s"] += e.seconds
        for e in self.computes[start_k:]:
            rows[e.tag]["compute_s"] += e.seconds
        out = []
        position = {tag: i for i, tag in enumerate(self._order)}
        for tag, row in sorted(rows.items(), key=lambda item: position.get(item[0], len(position))):
            out.append({
                "layer": tag,
                "collectives_per_step": {k: v / n_steps for k, v in sorted(row["ops"].items())},
                "bytes_per_step": row["bytes"] / n_steps,
                "comm_ms_per_step": row["comm_s"] * 1e3 / n_steps,
                "compute_ms_per_step": row["compute_s"] * 1e3 / n_steps,
                "R": row["comm_s"] / row["compute_s"] if row["compute_s"] > 0 else None,
            })  # fmt: skip
        return out

    def _offsets(self, skip_steps: int) -> tuple[int, int]:
        """Indices of the first collective and compute event after the first `skip_steps` steps."""
        skipped = self.steps[:skip_steps]
        return sum(s["collectives"] for s in skipped), sum(s["computes"] for s in skipped)

    def summary(self, skip_steps: int = 0) -> str:
        rows = self.layers(skip_steps)
        lines = [f"{'layer':<28} {'collectives / step':<28} {'bytes/step':>11} {'comm ms':>8} {'compute ms':>10} "
                 f"{'R':>6}"]  # fmt: skip
        short = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS"}
        for r in rows:
            ops = (
                " ".join(
                    f"{phase}:{short[op]}" + (f"x{v:g}" if v != 1 else "")
                    for key, v in r["collectives_per_step"].items()
                    for phase, op in [key.split()]
                )
                or "-"
            )
            ratio = f"{r['R']:.2f}" if r["R"] is not None else "-"
            lines.append(f"{r['layer']:<28} {ops:<28} {_human(r['bytes_per_step']):>11} "
                         f"{r['comm_ms_per_step']:>8.3f} {r['compute_ms_per_step']:>10.3f} {ratio:>6}")  # fmt: skip
        lines.append("AR all-reduce, AG all-gather, RS reduce-scatter; R = comm / compute of that layer")
        return "\n".join(lines)

    def to_dict(self, skip_steps: int = 0) -> dict:
        return {
            "steps": self.steps,
            "layers": self.layers(skip_steps),
            "collective_events": len(self.collectives),
        }

    def to_json(self, path: str, skip_steps: int = 0, **extra) -> None:
        with open(path, "w") as f:
            json.dump({**extra, **self.to_dict(skip_steps)}, f, indent=1, default=str)

    def to_chrome_trace(self, path: str, rank: int = 0) -> None:
        """A Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev): compute spans on one track,
        collectives on another, per layer."""
        events = [e.resolve() for e in self.collectives]
        origin = min([e.start for e in events] + [e.start for e in self.computes] + [float("inf")])
        trace = []
        for e in events:
            trace.append({"name": f"{e.op} {e.tag}", "cat": "comm", "ph": "X", "pid": rank, "tid": 1,
                          "ts": (e.start - origin) * 1e6, "dur": e.seconds * 1e6,
                          "args": {"bytes": e.nbytes, "phase": e.phase, "group_size": e.group_size}})  # fmt: skip
        for e in self.computes:
            trace.append({"name": f"{e.phase} {e.tag}", "cat": "compute", "ph": "X", "pid": rank, "tid": 0,
                          "ts": (e.start - origin) * 1e6, "dur": e.seconds * 1e6})  # fmt: skip
        names = [{"name": "thread_name", "ph": "M", "pid": rank, "tid": t, "args": {"name": n}}
                 for t, n in ((0, "compute"), (1, "collectives"))]  # fmt: skip
        with open(path, "w") as f:
            json.dump({"traceEvents": names + trace, "displayTimeUnit": "ms"}, f)

    def events(self) -> list[dict]:
        return [asdict(e.resolve()) | {"dtype": str(e.dtype), "cuda_events": None} for e in self.collectives]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def profile(model: torch.nn.Module | None = None) -> Profile:
    return Profile(model)
