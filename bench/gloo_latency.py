"""The latency floor of a decode step's collectives here: 2 gloo ranks x 1 thread, a [1, 576] fp32 tensor (SmolLM2's
hidden row, 2.3 KiB): all_reduce (ring: 2 dependent exchanges at tp=2), all_gather (one exchange: the one-shot
all-reduce of shardwise.decoding), all_gather + the local sum, and a raw TCP round trip of the same bytes between
two plain processes (the transport's floor without gloo's worker and device threads). Interleaved rounds, medians.

    python bench/gloo_latency.py [--calls 300 --rounds 6]   -> bench/results/gloo-latency-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise


def _collectives(calls: int, rounds: int) -> dict:
    shardwise.init_mesh(2)
    x, out = torch.randn(1, 576), torch.empty(2, 576)
    kinds = {"all_reduce": lambda: dist.all_reduce(x), "all_gather": lambda: dist.all_gather_single(out, x),
             "all_gather + sum": lambda: (dist.all_gather_single(out, x), out.sum(0))}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, call in kinds.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def _tcp_round_trip(calls: int) -> float:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    if os.fork() == 0:
        peer = socket.create_connection(server.getsockname())
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(calls):
            got = 0
            while got < 2304:
                got += len(peer.recv(4608))
            peer.sendall(b"x" * 2304)
        os._exit(0)
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    for _ in range(calls):
        conn.sendall(b"y" * 2304)
        got = 0
        while got < 2304:
            got += len(conn.recv(4608))
    seconds = time.perf_counter() - start
    os.wait()
    return 1e6 * seconds / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=f"bench/results/gloo-latency-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    us = shardwise.launch(_collectives, 2, args.calls, args.rounds)[0]
    us["raw TCP round trip (python, 2.3 KiB each way)"] = _tcp_round_trip(2000)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "bytes": 2304, "microseconds": us,
           "loadavg": [load, os.getloadavg()[0]]}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for name, value in us.items():
        print(f"{name}: {value:.0f} us")
    print(f"load {load:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
