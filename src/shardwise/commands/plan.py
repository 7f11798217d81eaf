"""`shardwise plan`: rank the layouts for a model on some hardware and say why."""

from __future__ import annotations

import json
from pathlib import Path

from ..planner.costmodel import plan
from ..planner.layouts import load_config, load_hardware, overlap_chunks, recommend, report


def main(model: str, devices: int, hardware: str | None, calibration: str | None, seq: int | None = None,
         micro_batch: int | None = None, global_batch: int | None = None, dtype_bytes: int | None = None,
         sequence_parallel: bool | None = None, json_out: str | None = None) -> int:  # fmt: skip
    cfg = load_config(model, seq, micro_batch, dtype_bytes)
    hw = load_hardware(hardware, calibration)
    options = plan(cfg, hw, devices, sequence_parallel, global_batch)
    if not options:
        print(f"no TP degree splits {cfg.heads} heads over divisors of {devices} devices")
        return 1
    print(report(cfg, hw, devices, options))
    best, why = recommend(options)
    print()
    print(why)
    if best is not None and best.tp > 1:
        k = overlap_chunks(cfg, hw, best)
        print(
            f"overlap: with sequence parallelism, pipeline each all-gather/reduce-scatter in k={k} chunk(s) "
            "(ColumnParallelLinear/RowParallelLinear overlap=True, chunks=k); this assumes the fabric moves data on "
            "its own engines (NVLink does; gloo on CPUs competes with the GEMMs, and k=1 measured best there)"
        )
    if json_out:
        Path(json_out).write_text(json.dumps({"config": cfg.__dict__, "hardware": hw.name, "devices": devices,
                                             "options": [p.to_dict() for p in options],
                                             "recommended_tp": best.tp if best else None}, indent=1))  # fmt: skip
    return 0 if best else 1
