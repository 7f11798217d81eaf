"""`shardwise train --adaptive`: the hardware the re-planner predicts with, the layouts it may pick, and the logs.

The step log (OUT/steps.jsonl, rank 0, every run) has one JSON line per step: {"step", "time" (unix s, when the
step ended), "step_s" (this rank's wall time of the step), "loss", "layout", "tokens"}; `shardwise lab adaptive`
reads it for per-phase throughput and to drive its rate schedule by step. With --adaptive, OUT/adaptive.jsonl
gets every decision and switch (AdaptiveController's records) and every line is also printed by rank 0; a layout
the model cannot run is predicted as Infinity (Python's json reads it; strict JSON parsers do not).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ..adaptive.controller import AdaptiveController, candidate_layouts
from ..live_reshard import Layout
from ..planner.profiles import from_calibration


def hardware(calibration: str | None, mesh):
    """The planner's Hardware for this job: `calibration` (a `shardwise calibrate` JSON), else a quick
    calibration of this job's own ranks right now (collective; a few seconds), shared by rank 0."""
    if calibration:
        return from_calibration(calibration)
    from ..planner.calibration import calibrate_here

    cal = calibrate_here(mesh, quick=True)
    box = [cal]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return from_calibration(box[0])


def parse_layouts(text: str | None) -> list[Layout] | None:
    """ "1:2,2:1:dp-inner" -> [Layout(1, 2), Layout(2, 1, "dp-inner")]; None/empty -> None (all feasible)."""
    if not text:
        return None
    return [Layout.parse(part.strip()) for part in text.split(",") if part.strip()]


def predicted_ms(predicted: dict[str, float]) -> str:
    """{layout: step seconds} -> "tp1dp4-tp-inner 85 ms, tp2dp2-dp-inner 226 ms", fastest first."""
    return ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(predicted.items(), key=lambda kv: kv[1]))


def brief(record: dict) -> str:
    """One readable line for a controller record (the JSON line has every number)."""
    if record.get("kind") == "decision":
        links = ", ".join(f"{k} {e['bandwidth_Bps'] * 8 / 1e6:.0f} Mbit/s (-{e['rel_uncertainty']:.0%})"
                          for k, e in record["estimates"].items())  # fmt: skip
        measured = f"{record['measured_s'] * 1e3:.0f} ms" if record.get("measured_s") else "-"
        verdict = f"-> {record['switch_to']}" if record["switch_to"] else "stays"
        return (f"step {record['step']}: {record['current']} {verdict} ({record['reason']}); links {links or '-'}; "
                f"predicted {predicted_ms(record['predicted_s'])}; measured {measured}")  # fmt: skip
    if record.get("kind") == "switch":
        return (f"step {record['step']}: switched {record['from']} -> {record['to']} in {record['seconds']:.2f} s "
                f"({record['bytes_moved'] / 2**20:.1f} MiB sent by rank 0)")  # fmt: skip
    return json.dumps(record)


class JsonLines:
    """Appends JSON lines to a file (rank 0 only; the others get a no-op), flushed per line so a watcher
    (the lab's step-driven rate schedule) sees each line as soon as it is written."""

    def __init__(self, path: Path | None, echo: bool = False, fresh: bool = True):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w" if fresh else "a", buffering=1) if path is not None else None  # noqa: SIM115
        self.echo = echo

    def __call__(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.echo:
            print(f"adaptive: {brief(record)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def controller(cfg, model_cfg, mesh, make_optimizer, out: Path, lead: bool) -> AdaptiveController:
    """The AdaptiveController of a train run (collective: the calibration and the process groups)."""
    layout = Layout(cfg.tp, cfg.dp, cfg.placement, model_cfg.sequence_parallel)
    hw = hardware(cfg.calibration, mesh)
    world = cfg.tp * cfg.dp
    candidates = parse_layouts(cfg.adaptive_layouts) or candidate_layouts(world, cfg.heads, cfg.batch, cfg.seq)
    for c in candidates:
        if c.tp * c.dp != world or cfg.heads % c.tp or cfg.batch % c.dp or c.sequence_parallel and cfg.seq % c.tp:
            raise ValueError(f"--adaptive-layouts: {c.name} does not fit {world} ranks, {cfg.heads} heads, "
                             f"--batch {cfg.batch}, --seq {cfg.seq}: tp must divide the heads (and the seq with "
                             "sp), dp the batch")  # fmt: skip
    log = JsonLines(out / "adaptive.jsonl" if lead else None, echo=True, fresh=not cfg.resume)
    # everything the Replanner was built from, so the log replays (tests/adaptive/test_replay.py)
    log({"kind": "start", "time": time.time(), "layout": layout.name, "candidates": [c.name for c in candidates],
         "every": cfg.replan_every, "model": model_cfg.to_dict(), "seq": cfg.seq, "global_batch": cfg.batch,
         "bucket_mb": cfg.bucket_mb, "horizon": cfg.horizon, "margin": cfg.margin})  # fmt: skip
    return AdaptiveController(model_cfg, seq=cfg.seq, global_batch=cfg.batch, hw=hw, layout=layout,
                              make_optimizer=make_optimizer, bucket_mb=cfg.bucket_mb, every=cfg.replan_every,
                              candidates=candidates, log=log, horizon_steps=cfg.horizon,
                              margin=cfg.margin)  # fmt: skip
