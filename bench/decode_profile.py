"""Where a tensor-parallel decode step's time goes, SmolLM2-135M at tp=2 (2 ranks x 1 thread): the general model
path (the parallelized Hugging Face module) vs shardwise's fast decoder. Per token: aten ops dispatched (exact,
counted with a TorchDispatchMode), collectives and their bytes (comm events), time inside collectives, and the
time in GEMMs (torch.profiler's aten::mm/addmm/linear self time) vs everything else (dispatch, Python, small ops).

    python bench/decode_profile.py [--steps 16] [--out bench/results/decode-profile-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import shardwise
from shardwise.comm import events
from shardwise.commands.registry import load_fast_decoder, load_model_sharded, resolve_spec, text_codec

PROMPT = "Once upon a time, in a small village by the sea,"  # 64+ tokens before EOS
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _rank(spec, tp: int, engine: str, steps: int) -> dict | None:
    mesh = shardwise.init_mesh(tp)
    if engine == "fast":
        decoder, tokenizer = load_fast_decoder(spec, mesh, max_len=256)
        prompt = text_codec(tokenizer)[0](PROMPT)
        token = decoder.greedy(decoder.prefill(0, prompt[0]))

        def step():
            nonlocal token
            token = decoder.greedy(decoder.decode([0], token))
    else:
        model, tokenizer = load_model_sharded(spec, mesh)
        prompt = text_codec(tokenizer)[0](PROMPT)
        with torch.no_grad():
            out = model(prompt, use_cache=True)
        state = {"pkv": out.past_key_values, "token": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step():
            with torch.no_grad():
                o = model(state["token"], past_key_values=state["pkv"], use_cache=True)
            state["pkv"], state["token"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(3):
        step()
    counter = _CountOps()
    with counter:
        step()
    collectives: list = []
    observe = lambda e: collectives.append(e) if isinstance(e, events.CollectiveEvent) else None  # noqa: E731
    events.add_observer(observe)
    walls = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
    finally:
        events.remove_observer(observe)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step()
    gemm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM) / 4
    if mesh.tp_rank:
        return None
    return {
        "engine": engine, "token_ms": 1e3 * statistics.median(walls),
        "aten_ops_per_token": sum(counter.ops.values()), "top_ops": counter.ops.most_common(8),
        "collectives_per_token": len(collectives) / steps,
        "collective_kinds": Counter(f"{e.op} {e.nbytes}B" for e in collectives).most_common(4),
        "comm_ms_per_token": 1e3 * sum(e.seconds for e in collectives) / steps,
        "gemm_ms_per_token_profiled": gemm_us / 1e3,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=f"bench/results/decode-profile-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    spec = resolve_spec("smollm2-135m")
    os.environ["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    rows = [shardwise.launch(_rank, 2, spec, 2, engine, args.steps)[0] for engine in ("model", "fast")]
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "tp": 2, "loadavg": [load, os.getloadavg()[0]], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| path | ms/token | aten ops/token | collectives/token | comm ms/token | GEMM ms/token (profiled) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['token_ms']:.1f} | {r['aten_ops_per_token']} | {r['collectives_per_token']:.0f} "
              f"| {r['comm_ms_per_token']:.1f} | {r['gemm_ms_per_token_profiled']:.1f} |")  # fmt: skip
    for r in rows:
        print(f"{r['engine']}: top ops {r['top_ops'][:6]}; collectives {r['collective_kinds']}")
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
