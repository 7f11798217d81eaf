"""`shardwise calibrate`: measure this machine's fabric and matmul speed, write the JSON the planner reads."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import shardwise

from ..planner.calibration import calibrate_rank


def main(tp: int, out: str, max_bytes: int = 64 * 2**20, hidden: int = 1024, tokens: int = 512) -> dict:
    result = shardwise.launch(calibrate_rank, tp, tp, max_bytes, hidden, tokens)[0]
    result |= {"host": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "backend": "gloo", "threads_per_rank": 1, "devices_per_node": tp}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"shardwise calibrate: tp={tp} gloo ranks on {result['host']}")
    print(f"{'op':<16} {'alpha (us)':>11} {'beta (GB/s)':>12} {'fit err med':>12} {'fit err max':>12}")
    for op, f in result["fits"].items():
        print(f"{op:<16} {f['alpha_s'] * 1e6:>11.1f} {f['bandwidth_GBps']:>12.2f} {f['median_rel_error']:>12.1%} "
              f"{f['max_rel_error']:>12.1%}")  # fmt: skip
    print(f"matmul: {result['matmul_flops'] / 1e9:.1f} GFLOP/s per rank at h={hidden}, {tokens} tokens")
    print(f"written: {out}  (use: shardwise plan --calibration {out})")
    return result
