"""Load on `shardwise serve`: N concurrent streaming clients vs the same N requests sent one after another.

    python bench/serve_load.py [--model smollm2-135m] [--tp 2] [--clients 8] [--tokens 64] [--compile]

Starts the server (the real CLI, its own process session), waits for it, sends one warm-up request, then runs the
two phases alternately (--repeats times each, the order swapped every repeat so drift hits both): "concurrent",
all clients at once through the official `openai` client, streaming; "serial", the same requests one at a time.
Per phase: throughput (completion tokens / wall seconds), time to first token and per-token latency as the client
sees them (the gap between consecutive streamed chunks; a chunk is one token unless the server held text back
for a stop string or a partial UTF-8 character), the server's comm seconds per token and its decode batch sizes
(deltas of /metrics across the phase). JSON to --out, a markdown summary to stdout. Greedy (temperature 0): the
concurrent and serial texts must be identical, checked here."""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in the morning.",
    "List many ideas for a weekend project with a small garden.",
    "Tell me about the history of the printing press.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why the sky is blue, step by step.",
    "Describe how to bake bread at home, with every step.",
]


def _metrics(base: str) -> dict:
    import httpx

    samples = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(r"([a-z_0-9]+)\{([^}]*)\} (\S+)", line)
        if m:
            le = re.search(r'le="([^"]+)"', m.group(2))
            samples[(m.group(1), le.group(1) if le else None)] = float(m.group(3))
    return samples


def _request(client, model: str, prompt: str, tokens: int) -> dict:
    """One streamed chat completion -> {text, ttft_s, gaps_s, chunks}; times from just before the call."""
    start = time.perf_counter()
    stamps, text = [], []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=tokens, temperature=0, stream=True)  # fmt: skip
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            stamps.append(time.perf_counter())
            text.append(piece)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"text": "".join(text), "ttft_s": stamps[0] - start if stamps else None, "gaps_s": gaps,
            "chunks": len(stamps)}  # fmt: skip


def _phase(name: str, client, base: str, model: str, tokens: int, clients: int) -> dict:
    before = _metrics(base)
    start = time.perf_counter()
    results: list[dict | None] = [None] * clients
    if name == "concurrent":
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _request(client, model, PROMPTS[i %
                   len(PROMPTS)], tokens))) for i in range(clients)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        if None in results:
            raise RuntimeError(f"serve_load: {results.count(None)} of {clients} concurrent requests failed")
    else:
        for i in range(clients):
            results[i] = _request(client, model, PROMPTS[i % len(PROMPTS)], tokens)
    wall = time.perf_counter() - start
    after = _metrics(base)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    done = [r for r in results if r is not None]
    n_tokens = delta(("shardwise_serve_tokens_generated_total", None))
    comm_n = delta(("shardwise_serve_comm_seconds_per_token_count", None))
    steps = delta(("shardwise_serve_batch_size_count", None))
    gaps = sorted(g for r in done for g in r["gaps_s"])
    ttft = sorted(r["ttft_s"] for r in done if r["ttft_s"] is not None)

    def q(values, p):
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {
        "phase": name, "completed": len(done), "wall_s": wall, "completion_tokens": int(n_tokens),
        "tokens_per_s": n_tokens / wall,
        "token_latency_p50_ms": 1e3 * q(gaps, 0.5), "token_latency_p99_ms": 1e3 * q(gaps, 0.99),
        "ttft_p50_ms": 1e3 * q(ttft, 0.5), "ttft_p99_ms": 1e3 * q(ttft, 0.99),
        "comm_ms_per_token": 1e3 * delta(("shardwise_serve_comm_seconds_per_token_sum", None)) / max(comm_n, 1),
        "decode_steps": int(steps),
        "mean_batch": delta(("shardwise_serve_batch_size_sum", None)) / max(steps, 1),
        "texts": [r["text"] for r in results if r is not None],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--out", default="bench/results/serve-load-2026-11-22.json")
    args = parser.parse_args()
    import openai

    from shardwise.launch import free_port

    port = args.port or free_port()
    cmd = [sys.executable, "-m", "shardwise", "serve", args.model, "--tp", str(args.tp), "--port", str(port),
           "--max-batch", str(args.max_batch), "--timeout-s", "300"] + ["--compile"] * args.compile  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while not any("serving on" in line for line in log):
            if proc.poll() is not None or time.monotonic() > deadline:
                print("".join(log), file=sys.stderr)
                raise SystemExit("serve_load: the server did not start")
            try:
                log.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600, max_retries=0)
        _request(client, args.model, PROMPTS[0], 8)  # warm-up (first-call costs, compiles of batch size 1)
        runs = []
        for rep in range(args.repeats):
            order = ("concurrent", "serial") if rep % 2 == 0 else ("serial", "concurrent")
            for name in order:
                runs.append(_phase(name, client, base, args.model, args.tokens, args.clients))
        by = {name: [r for r in runs if r["phase"] == name] for name in ("concurrent", "serial")}
        same = all(r["texts"] == by["serial"][0]["texts"] for r in runs)
        summary = {}
        for name, rs in by.items():
            keys = [k for k in rs[0] if isinstance(rs[0][k], float | int) and k != "completed"]
            summary[name] = {k: statistics.median(r[k] for r in rs) for k in keys}
        ratio = summary["concurrent"]["tokens_per_s"] / summary["serial"]["tokens_per_s"]
        startup = next(line.strip() for line in log if "serving on" in line)
        result = {"model": args.model, "tp": args.tp, "clients": args.clients, "tokens": args.tokens,
                  "compile": args.compile, "max_batch": args.max_batch, "server": startup,
                  "OMP_NUM_THREADS": env["OMP_NUM_THREADS"], "greedy_texts_identical": same,
                  "throughput_ratio_concurrent_over_serial": ratio, "summary": summary,
                  "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs]}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"## serve load: {args.model} tp={args.tp}, {args.clients} streaming clients x {args.tokens} tokens"
              f"{' (compiled)' if args.compile else ''}\n")  # fmt: skip
        print("| phase | tokens/s | token p50 ms | token p99 ms | TTFT p50 ms | TTFT p99 ms | comm ms/token | "
              "mean batch |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
        for name, s in summary.items():
            print(f"| {name} | {s['tokens_per_s']:.1f} | {s['token_latency_p50_ms']:.1f} | "
                  f"{s['token_latency_p99_ms']:.1f} | {s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} | "
                  f"{s['comm_ms_per_token']:.2f} | {s['mean_batch']:.2f} |")  # fmt: skip
        print(f"\nconcurrent / serial throughput: {ratio:.2f}x; greedy texts identical: {same}; JSON: {args.out}")
        return 0 if same else 1
    except BaseException:
        time.sleep(1)
        while not lines.empty():
            log.append(lines.get())
        print("serve_load: the server's output:\n" + "".join(log[-60:]), file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
