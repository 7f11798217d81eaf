"""PNG charts of where the time goes (matplotlib, headless)."""

from __future__ import annotations

import math


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def finish(fig, ax, path: str, title: str) -> str:
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def steps_chart(steps: list[dict], path: str, title: str) -> str:
    """Per step: compute and collective time stacked, R = comm/compute on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [s["step"] for s in steps]
    compute = [s["compute_ms"] for s in steps]
    comm = [s["comm_ms"] for s in steps]
    ax.bar(xs, compute, width=1.0, label="compute", color="#4c72b0")
    ax.bar(xs, comm, width=1.0, bottom=compute, label="in collectives", color="#dd8452")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ratio = ax.twinx()
    R = [math.nan if s["R"] is None else s["R"] for s in steps]  # None: nothing observed (a compiled step)
    ratio.plot(xs, R, color="black", linewidth=0.8, label="R = comm/compute")
    ratio.set_ylabel("R")
    handles = ax.get_legend_handles_labels()[0] + ratio.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    return finish(fig, ax, path, title)


def layers_chart(layers: list[dict], path: str, title: str) -> str:
    """Per layer: compute and collective ms per step, side by side."""
    plt = pyplot()
    names = [r["layer"] for r in layers]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [r["compute_ms_per_step"] for r in layers], height=0.4, label="compute")
    ax.barh([y + 0.2 for y in ys], [r["comm_ms_per_step"] for r in layers], height=0.4, label="collectives")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.legend()
    return finish(fig, ax, path, title)


def ratio_vs_tp_chart(rows: list[dict], path: str, title: str) -> str:
    """R(m) against m: measured and predicted. rows: {"tp", "R_measured", "R_predicted"}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    tps = [r["tp"] for r in rows]
    ax.plot(tps, [r["R_measured"] for r in rows], "o-", label="measured")
    ax.plot(tps, [r["R_predicted"] for r in rows], "s--", label="predicted (cost model)")
    ax.axhline(1.0, color="grey", linewidth=0.7)
    ax.set_xlabel("tensor-parallel degree m")
    ax.set_ylabel("R(m) = T_comm / T_comp")
    ax.set_xticks(tps)
    ax.legend()
    return finish(fig, ax, path, title)


def overlap_chart(comparison: dict, path: str, title: str) -> str:
    """Step time and exposed collective time, overlap off vs on (medians)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    modes = ["overlap_off", "overlap_on"]
    xs = range(len(modes))
    ax.bar([x - 0.2 for x in xs], [comparison[m]["step_ms"] for m in modes], width=0.4, label="step")
    ax.bar([x + 0.2 for x in xs], [comparison[m]["exposed_comm_ms"] for m in modes], width=0.4,
           label="exposed collectives")  # fmt: skip
    ax.set_xticks(list(xs), ["overlap off", "overlap on"])
    ax.set_ylabel("ms (median)")
    ax.legend()
    return finish(fig, ax, path, title)
