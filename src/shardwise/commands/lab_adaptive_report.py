"""`shardwise lab adaptive`'s table and chart: throughput per phase and per step, rates and switches marked."""

from __future__ import annotations


def table(summary: dict) -> str:
    static, adaptive = summary["static_tokens_per_s"], summary["adaptive_tokens_per_s"]
    best = summary.get("best_low_tokens_per_s", {})
    lines = [f"{'phase':<11} {'rate':>9} {'static tok/s':>13} {'adaptive tok/s':>15} {'adaptive/static':>16}"
             + (f" {'best static':>12}" if best else "")]  # fmt: skip
    rates = {"peak": summary["peak"], "low": summary["low"], "peak again": summary["peak"]}
    for phase, value in adaptive.items():
        s = static.get(phase)
        row = f"{phase:<11} {rates[phase]:>9} {s or float('nan'):>13.0f} {value:>15.0f} "
        row += f"{value / s:>15.2f}x" if s else f"{'-':>16}"
        if best:
            row += f" {best.get(phase, float('nan')):>12.0f}"
        lines.append(row)
    lines.append(f"static layout {summary['static_layout']}; planner's pick at {summary['low']}: "
                 f"{summary['best_low_layout']}")  # fmt: skip
    for s in summary["switches"]:
        lines.append(f"switch after step {s['step']}: {s['from']} -> {s['to']} ({s['seconds']:.2f} s)")
    if not summary["switches"]:
        lines.append("no switches")
    if summary["loss_max_abs_diff"] is not None:
        lines.append(f"largest |loss(adaptive) - loss(static)| over all steps: {summary['loss_max_abs_diff']:.2e}")
    lines.append(f"{summary['wall_s']:.0f} s; load average {', '.join(f'{x:.2f}' for x in summary['load_avg'])}")
    return "\n".join(lines)


def chart(runs: dict, per_phase: int, phases: int, summary: dict, path: str) -> str:
    from .plots import finish, pyplot

    fig, ax = pyplot().subplots(figsize=(9, 4))
    for name, run in runs.items():
        steps = run["steps"]
        ax.plot([r["step"] for r in steps], [r["tokens"] / r["step_s"] for r in steps], linewidth=0.8,
                label=f"{name} ({run['layout']})")  # fmt: skip
    if phases == 3:
        ax.axvspan(per_phase + 0.5, 2 * per_phase + 0.5, color="grey", alpha=0.15,
                   label=f"link at {summary['low']} (else {summary['peak']})")  # fmt: skip
    for i, s in enumerate(summary["switches"]):
        ax.axvline(s["step"] + 0.5, color="red", linestyle="--", linewidth=0.8,
                   label="adaptive switches" if i == 0 else None)  # fmt: skip
        ax.annotate(s["to"], (s["step"] + 0.5, ax.get_ylim()[1] * 0.95), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    return finish(fig, ax, path, "shardwise lab adaptive: static vs adaptive TP")
