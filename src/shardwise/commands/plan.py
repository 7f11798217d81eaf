"""`shardwise plan`: rank the layouts for a model on some hardware and say why."""

from __future__ import annotations

import json
from pathlib import Path

from ..planner.costmodel import plan
from ..planner.layouts import load_config, load_hardware, overlap_chunks, recommend, report


def main(model: str, devices: int, hardware: str | None, calibration: str | None, seq: int | None = None,
         micro_batch: int | None = None, global_batch: int | None = None, dtype_bytes: int | None = None,
         sequence_parallel: bool | None = None, json_out: str | None = None, *, placement: str | None = None,
         recompute: str | None = None, overlap: bool | None = None, zero: bool | None = None,
         bucket_mb: float = 25, devices_per_node: int | None = None) -> int:  # fmt: skip
    cfg = load_config(model, seq, micro_batch, dtype_bytes)
    hw = load_hardware(hardware, calibration, devices_per_node)
    options = plan(cfg, hw, devices, sequence_parallel, global_batch, placement=placement, recompute=recompute,
                   overlap=overlap, zero=zero, bucket_mb=bucket_mb)  # fmt: skip
    if not options:
        print(f"no TP degree splits {cfg.heads} heads over divisors of {devices} devices")
        return 1
    print(report(cfg, hw, devices, options))
    best, why = recommend(options, hw, cfg)
    print()
    print(why)
    if best is not None and best.tp > 1 and best.sequence_parallel and hw.can_overlap:
        k = overlap_chunks(cfg, hw, best)
        print(f"overlap: pipeline each sequence-parallel all-gather/reduce-scatter in k={k} chunk(s) "
              "(ColumnParallelLinear/RowParallelLinear overlap=True, chunks=k)")  # fmt: skip
    if json_out:
        Path(json_out).write_text(json.dumps({"config": cfg.__dict__, "hardware": hw.name, "devices": devices,
                                             "options": [p.to_dict() for p in options],
                                             "recommended_tp": best.tp if best else None,
                                             "recommended": best.to_dict() if best else None, "why": why},
                                            indent=1))  # fmt: skip
    return 0 if best else 1
