"""Markdown table from bench/mlp.py's JSON: python bench/report.py RUN.json [RUN2.json ...]

The first file gives the table's times; every file gives a ratio column, so runs can be compared.
Prints the table, the correctness checks and, for shardwise, the target check (within 5% of the
minimal reference's median, 10% at h=128; not slower than DTensor beyond noise).
"""

from __future__ import annotations

import json
import sys

ORDER = ["dense", "minimal", "shardwise", "dtensor", "megatron-core", "fairscale"]
MODES = ["tp", "sp", "tp1"]


def key(row):
    return (MODES.index(row["mode"]), row["h"], row["tokens"], ORDER.index(row["impl"]))


def index(run):
    return {(r["impl"], r["h"], r["tokens"], r["mode"]): r for r in run["rows"]}


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    first = runs[0]
    idx = [index(r) for r in runs]
    head = "| impl | h | tokens | mode | median ms | p90 ms | ratio to minimal | paired ratio [IQR] |"
    sep = "|---|---:|---:|---|---:|---:|---:|---|"
    if len(runs) > 1:
        head += "".join(f" run {i + 1}: ratio / paired |" for i in range(1, len(runs)))
        sep += "---:|" * (len(runs) - 1)
    print(head)
    print(sep)
    for row in sorted(first["rows"], key=key):
        k = (row["impl"], row["h"], row["tokens"], row["mode"])
        iqr = row["paired_ratio_iqr"]
        line = (
            f"| {row['impl']} | {row['h']} | {row['tokens']} | {row['mode']} | {row['median_ms']:.3f} | "
            f"{row['p90_ms']:.3f} | {row['ratio_to_minimal']:.3f} | {row['paired_ratio_median']:.3f} "
            f"[{iqr[0]:.2f}, {iqr[1]:.2f}] |"
        )
        for other in idx[1:]:
            o = other.get(k)
            line += f" {o['ratio_to_minimal']:.3f} / {o['paired_ratio_median']:.3f} |" if o else " - |"
        if row["impl"] == "shardwise":
            line = line.replace("| shardwise |", "| **shardwise** |", 1)
        print(line)
    print()
    print("Target check for shardwise (limit: 1.05, 1.10 at h=128; ratio of medians / paired median per run):")
    for row in sorted(first["rows"], key=key):
        if row["impl"] != "shardwise" or row["mode"] == "tp1":
            continue
        k = (row["impl"], row["h"], row["tokens"], row["mode"])
        limit = 1.10 if row["h"] == 128 else 1.05
        vals = []
        for run in idx:
            r = run.get(k)
            if r:
                dt = run.get(("dtensor", row["h"], row["tokens"], row["mode"]))
                vs_dt = r["median_ms"] / dt["median_ms"] if dt else float("nan")
                vals.append(f"{r['ratio_to_minimal']:.3f}/{r['paired_ratio_median']:.3f} (vs DTensor {vs_dt:.2f})")
        print(f"- {row['mode']} h={row['h']} tokens={row['tokens']}: limit {limit:.2f}: " + "; ".join(vals))
    print()
    print("Correctness (max abs error vs the dense model over both ranks, first run):")
    for c in first["checks"]:
        grads = c["err_grads"]
        worst = max(grads.values())
        note = "" if worst < 1e-3 else f" (per grad: {grads})"
        print(
            f"- {c['impl']} h={c['h']} tokens={c['tokens']} {c['mode']}: y {c['err_y']:.1e}, dx {c['err_dx']:.1e}, "
            f"param grads {worst:.1e}{note}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
