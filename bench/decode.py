"""Greedy decoding of SmolLM2-135M: dense vs tensor-parallel, general model path vs shardwise's fast decoder, eager
vs compiled. Interleaved rounds (every configuration once per round, in order), per-token latency = median of the
intervals between tokens (64 new tokens, the prompt's prefill excluded), paired ratios per round vs the dense run
at the same setting, the split into compute and communication, the tokens checked identical across configurations.

    python bench/decode.py [--rounds 3] [--tokens 64] [--no-compile] [--out bench/results/decode-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import shardwise
from shardwise.commands.generate import _run, _run_fast, _split
from shardwise.commands.registry import load_fast_decoder, load_model_sharded, resolve_spec, text_codec

PROMPT = "Once upon a time, in a small village by the sea,"  # 64+ tokens before EOS


def _rank(spec, tp: int, engine: str, compile_: bool, tokens: int) -> dict | None:
    mesh = shardwise.init_mesh(tp)
    cfg = {"max_new_tokens": tokens, "temperature": 0.0, "top_k": None, "seed": 0}
    stamps: list[float] = []
    if engine == "fast":
        decoder, tokenizer = load_fast_decoder(spec, mesh, max_len=256, compile=compile_)
        prompt = text_codec(tokenizer)[0](PROMPT)
        warm = time.perf_counter()
        decoder.decode([0], decoder.greedy(decoder.prefill(0, prompt[0])))  # compiles here when compiled
        warm = time.perf_counter() - warm
        new, steps = _run_fast(decoder, tokenizer, prompt, cfg, stream=False, on_token=lambda: stamps.append(
            time.perf_counter()))  # fmt: skip
        split = _split(steps)
    else:
        model, tokenizer = load_model_sharded(spec, mesh)
        prompt = text_codec(tokenizer)[0](PROMPT)
        warm = 0.0
        out = _run(model, tokenizer, prompt, cfg, stream=False, on_token=lambda: stamps.append(time.perf_counter()))
        new, split = out[0, prompt.shape[1] :].tolist(), {}
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if mesh.tp_rank:
        return None
    p90 = sorted(gaps)[int(0.9 * len(gaps))]
    return {"tokens": new, "token_ms": 1e3 * statistics.median(gaps), "p90_ms": 1e3 * p90, "split": split,
            "warmup_s": warm}  # fmt: skip


CONFIGS = [  # name, tp, threads per rank, engine, compiled
    ("dense model-path", 1, 1, "model", False),
    ("tp2 model-path", 2, 1, "model", False),
    ("dense fast", 1, 1, "fast", False),
    ("dense fast 2 threads", 1, 2, "fast", False),
    ("tp2 fast", 2, 1, "fast", False),
    ("dense fast compiled", 1, 1, "fast", True),
    ("dense fast compiled 2 threads", 1, 2, "fast", True),
    ("tp2 fast compiled", 2, 1, "fast", True),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=f"bench/results/decode-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    spec = resolve_spec("smollm2-135m")
    configs = [c for c in CONFIGS if not (args.no_compile and c[4])]
    runs: dict[str, list[dict]] = {c[0]: [] for c in configs}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, tp, threads, engine, compiled in configs:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            result = shardwise.launch(_rank, tp, spec, tp, engine, compiled, args.tokens)[0]
            runs[name].append(result)
            print(f"round {r} {name}: {result['token_ms']:.1f} ms/token {result['split'] or ''}", flush=True)
        load.append(os.getloadavg()[0])
    reference = runs[configs[0][0]][0]["tokens"]
    rows = []
    for name, tp, threads, engine, compiled in configs:
        rs = runs[name]
        dense_name = {("model", False): "dense model-path", ("fast", False): "dense fast",
                      ("fast", True): "dense fast compiled"}[(engine, compiled)]  # fmt: skip
        dense2 = "dense fast compiled 2 threads" if compiled else "dense fast 2 threads"
        ratio = [a["token_ms"] / b["token_ms"] for a, b in zip(rs, runs[dense_name], strict=True)]
        ratio2 = [a["token_ms"] / b["token_ms"] for a, b in zip(rs, runs.get(dense2, rs), strict=True)]
        splits = [x["split"] for x in rs if x["split"]]
        rows.append({
            "name": name, "tp": tp, "threads": threads, "engine": engine, "compiled": compiled,
            "token_ms": statistics.median(x["token_ms"] for x in rs),
            "p90_ms": statistics.median(x["p90_ms"] for x in rs),
            "vs_dense_1thread": statistics.median(ratio), "vs_dense_2threads": statistics.median(ratio2),
            "compute_ms": statistics.median(s["compute_ms"] for s in splits) if splits else None,
            "comm_ms": statistics.median(s["comm_ms"] for s in splits) if splits else None,
            "collectives_per_token": splits[0]["collectives"] if splits else None,
            "warmup_s": max(x["warmup_s"] for x in rs), "same_tokens": all(x["tokens"] == reference for x in rs),
            "per_round_ms": [x["token_ms"] for x in rs],
        })  # fmt: skip
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "smollm2-135m", "prompt": PROMPT, "tokens": args.tokens,
           "rounds": args.rounds, "cores": os.cpu_count(), "loadavg_per_round": load, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        "\n| configuration | ms/token (median) | p90 | vs dense same path, 1 thread | vs dense 2 threads "
        "| compute ms | comm ms | collectives/token | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for row in rows:
        print(f"| {row['name']} | {row['token_ms']:.1f} | {row['p90_ms']:.1f} | {row['vs_dense_1thread']:.2f}x | "
              f"{row['vs_dense_2threads']:.2f}x | {fmt(row['compute_ms'])} | {fmt(row['comm_ms'])} | "
              f"{row['collectives_per_token'] or '-'} | {row['same_tokens']} |")  # fmt: skip
    print(f"\nload average per round: {', '.join(f'{x:.1f}' for x in load)}; written {args.out}")


if __name__ == "__main__":
    main()
