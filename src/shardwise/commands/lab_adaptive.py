"""`shardwise lab adaptive`: static vs adaptive tensor parallelism on emulated nodes while the link rate drops.

1. a fabric of --nodes x --procs-per-node; a quick calibration of its ranks at --calibration-rate;
2. the planner's pick at the peak rate (cost model v2 on that calibration) is the STATIC layout;
3. `shardwise train` at the static layout, then `shardwise train --adaptive` from the same layout, the same steps,
   batches and seed: each run in three phases of --steps-per-phase steps, peak / --low / peak rate. The rate
   changes when the run's step log (OUT/steps.jsonl) reaches the phase's first step, so both runs see the drop
   at the same step whatever their speed;
4. per phase: median tokens/s of each run, the adaptive run's switches (step, from, to), the largest loss
   difference between the runs at any step; a PNG of throughput per step with the rates and switches marked;
   the last line of output is one JSON object (`{"static_tokens_per_s": {...}, "adaptive_tokens_per_s": {...},
   "switches": [...], "loss_max_abs_diff": x, ...}`).
Learning rate 3e-4 by default: the loss comparison asks the two runs to agree within 1e-4 at every step, and fp32
training is chaotic: rounding differences between layouts grow. Measured here: h=256, 100 steps, no lab, static
tp1dp2 vs static tp2dp1 differ by 5e-5 after 26 steps and 5e-2 after 70 at lr 3e-3, by 9e-6 at most at lr 1e-3;
in this demo's 240 steps (2x2) at lr 1e-3 the static run and the static low-rate layout differ by 4.9e-2, the
adaptive run and the static one by 1.5e-3 (bench/ADAPTIVE.md); at 3e-4 by < 1e-6.
--constant: one adaptive run at the peak rate only (no drop): how many switches noise alone causes.
--best-low: also run the planner's pick at the low rate statically (is adaptive within 10% of it?).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

PHASES = ("peak", "low", "peak again")


def add_parser(lsub) -> None:
    p = lsub.add_parser("adaptive", help="static vs adaptive TP while the lab drops the link rate mid-run",
                        description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--procs-per-node", type=int, default=2)
    p.add_argument("--peak", default="unshaped", help="the link's full rate (unshaped: the veth's own)")
    p.add_argument("--low", default="100mbit", help="the rate of the middle phase ('20%%': a fifth of --peak)")
    p.add_argument("--steps-per-phase", type=int, default=80)
    p.add_argument("--quick", action="store_true", help="40 steps per phase (under 3 minutes)")
    p.add_argument("--constant", action="store_true", help="adaptive only, peak rate throughout: count switches")
    p.add_argument("--best-low", action="store_true", help="also run the low rate's best layout statically")
    p.add_argument("--calibration-rate", default="1gbit",
                   help="the link rate of the calibration run: shaped, so a 1 MiB transfer outweighs the ranks' skew "
                   "(an unshaped quick calibration fitted the 4-rank inter all-reduce's beta to 0 here)")  # fmt: skip
    p.add_argument("--static", default=None, metavar="TP:DP[:PLACEMENT]",
                   help="the static layout (default: the planner's pick at --peak)")  # fmt: skip
    p.add_argument("--replan-every", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (over all dp ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam's learning rate (see the module doc)")
    p.add_argument("--out", default="shardwise-lab-adaptive")
    p.add_argument("--timeout", type=float, default=1800.0)


def _bits(rate: str) -> int | None:
    from shardwise.lab import parse_rate

    return parse_rate(rate)


def _rate_name(bits: int) -> str:
    return f"{bits // 1_000_000}mbit" if bits % 1_000_000 == 0 else f"{bits // 1000}kbit"


def read_json_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a log another process may still be writing (a partial last line stops it)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


class StepSchedule:
    """on_tick for Fabric.torchrun: set the rate of each phase when the job's step log reaches its first step."""

    def __init__(self, fab, steps_file: Path, changes: list[tuple[int, str | None]]):
        self.fab, self.file, self.todo, self.applied = fab, steps_file, sorted(changes), []
        self.offset, self.last_step = 0, 0

    def __call__(self, now: float) -> None:
        if not self.todo or not self.file.is_file():
            return
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            self.last_step = max(self.last_step, json.loads(line)["step"])
        while self.todo and self.last_step >= self.todo[0][0]:
            step, rate = self.todo.pop(0)
            self.fab.set_rate(rate)
            self.applied.append({"after_step": step, "rate": rate or "unshaped", "time": time.time()})


def _static_pick(cal: dict, args, world: int, rate_bits: int | None):
    """The planner's best layout for the lab's GPT at `rate_bits` (None: unshaped), and every
    candidate's predicted step seconds: the Replanner's own predictions, the inter link scaled to the rate."""
    from shardwise.adaptive import LinkEstimate, Replanner
    from shardwise.adaptive.bandwidth import reference_link
    from shardwise.adaptive.controller import candidate_layouts
    from shardwise.adaptive.replanner import live_hardware
    from shardwise.nn import GPTConfig
    from shardwise.planner.profiles import from_calibration
    from shardwise.planner.workload import gpt_config

    hw = from_calibration(cal)
    gpt = GPTConfig(vocab_size=256, hidden=args.hidden, num_layers=args.layers, num_heads=args.heads)
    layouts = candidate_layouts(world, args.heads, args.batch, args.seq)
    planner = Replanner(gpt_config(gpt, args.seq, 1), hw, world, layouts, args.batch)
    estimates = {}
    peak_bits = _bits(cal.get("link_rate") or "unshaped")
    ref = reference_link(hw, "inter")
    if ref is not None and (rate_bits != peak_bits or rate_bits is None):
        # the calibrated link scaled by the rate ratio (keeps its measured efficiency); an unshaped veth link runs
        # through the same kernel path as loopback: the calibrated intra link's rate
        intra = reference_link(hw, "intra")
        if rate_bits is None:
            bw = intra.bandwidth if intra is not None else ref.bandwidth
        else:
            bw = ref.bandwidth * rate_bits / peak_bits if peak_bits else rate_bits / 8
        estimates["inter"] = LinkEstimate("inter", ref.latency_s, 1 / bw, bw, 0.0, 1)
    predicted = planner.predict_all(live_hardware(hw, estimates))
    return min(layouts, key=lambda c: predicted[c.name]), predicted


def _train_argv(args, layout, out: Path, text: Path, steps: int, adaptive: bool, cal: Path) -> list[str]:
    argv = [sys.executable, "-m", "shardwise", "train", "--tp", str(layout.tp), "--dp", str(layout.dp),
            "--placement", layout.placement, "--steps", str(steps), "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--heads", str(args.heads), "--batch", str(args.batch),
            "--seq", str(args.seq), "--out", str(out), "--text", str(text), "--no-progress",
            "--lr", str(args.lr), "--eval-every", "0", "--checkpoint-every", "0"]  # fmt: skip
    if adaptive:
        argv += ["--adaptive", "--calibration", str(cal), "--replan-every", str(args.replan_every)]
    return argv


def _phase_stats(steps: list[dict], per_phase: int, phases: int) -> dict[str, float]:
    out = {}
    for i in range(phases):
        rows = [r for r in steps if i * per_phase < r["step"] <= (i + 1) * per_phase]
        if rows:
            out[PHASES[i]] = rows[0]["tokens"] / statistics.median(r["step_s"] for r in rows)
    return out


def run(args) -> int:
    from shardwise.lab import Fabric, LabError

    from .train import shakespeare_text
    from .train_adaptive import predicted_ms

    per_phase = 40 if args.quick else args.steps_per_phase
    peak_bits = _bits(args.peak)
    if peak_bits is None and args.low == "20%":
        print("shardwise lab adaptive: give --low as a rate when --peak is unshaped (20% of it is undefined)",
              file=sys.stderr)  # fmt: skip
        return 2
    low = _rate_name(peak_bits // 5) if args.low == "20%" else args.low
    given = None  # --static, checked before the fabric and the calibration run
    if args.static:
        from shardwise.live_reshard import Layout

        given = Layout.parse(args.static)
        if given.sequence_parallel:
            print("shardwise lab adaptive: --static takes TP:DP[:PLACEMENT]; the demo's runs do not use "
                  "sequence parallelism", file=sys.stderr)  # fmt: skip
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .registry import default_cache_dir

    text = default_cache_dir() / "shakespeare.txt"  # fetched here, on the host's network: the lab's nodes have none
    if not text.is_file():
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(shakespeare_text(), encoding="utf-8")
    world = args.nodes * args.procs_per_node
    env = {"OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    runs: dict[str, dict] = {}
    try:
        with Fabric(nodes=args.nodes, rate=args.calibration_rate) as fab:
            cal_path = out / "calibration.json"
            res = fab.torchrun([sys.executable, "-m", "shardwise", "calibrate", "--quick", "--out", str(cal_path)],
                               args.procs_per_node, env, args.timeout)  # fmt: skip
            if not res.ok:
                print("\n".join(res.logs), file=sys.stderr)
                return 1
            cal = json.loads(cal_path.read_text())
            static, predicted_peak = _static_pick(cal, args, world, _bits(args.peak))
            best_low, predicted_low = _static_pick(cal, args, world, _bits(low))
            print(f"lab adaptive: {args.nodes} nodes x {args.procs_per_node}, peak {args.peak}, low {low}; planner: "
                  f"{static.name} at peak ({predicted_ms(predicted_peak)}), {best_low.name} at {low} "
                  f"({predicted_ms(predicted_low)})", flush=True)  # fmt: skip
            if given is not None:
                static = given
                print(f"lab adaptive: static layout {static.name} (--static)", flush=True)
            plan = [("adaptive", static, True)] if args.constant else [("static", static, False),
                                                                       ("adaptive", static, True)]  # fmt: skip
            if args.best_low and not args.constant:
                plan.append(("static-low-best", best_low, False))
            phases = 1 if args.constant else 3
            changes = [] if args.constant else [(per_phase, low), (2 * per_phase, args.peak)]
            for name, layout, adaptive in plan:
                run_dir = out / name
                (run_dir / "steps.jsonl").unlink(missing_ok=True)
                fab.set_rate(args.peak)
                schedule = StepSchedule(fab, run_dir / "steps.jsonl", changes)
                t0 = time.perf_counter()
                res = fab.torchrun(_train_argv(args, layout, run_dir, text, phases * per_phase, adaptive, cal_path),
                                   args.procs_per_node, env, args.timeout, on_tick=schedule)  # fmt: skip
                if not res.ok:
                    print("\n".join(log[-3000:] for log in res.logs), file=sys.stderr)
                    return 1
                runs[name] = {"layout": layout.name, "steps": read_json_lines(run_dir / "steps.jsonl"),
                              "rates": schedule.applied, "wall_s": time.perf_counter() - t0,
                              "decisions": read_json_lines(run_dir / "adaptive.jsonl") if adaptive else []}  # fmt: skip
                print(f"lab adaptive: {name} ({layout.name}) {runs[name]['wall_s']:.0f} s", flush=True)
    except LabError as exc:
        print(f"shardwise lab adaptive: error: {exc}", file=sys.stderr)
        return 1
    summary = _summarise(runs, per_phase, phases, args, low, static, best_low, time.perf_counter() - began)
    summary["planner_predicted_s"] = {"peak": predicted_peak, "low": predicted_low}
    (out / "summary.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
    from .lab_adaptive_report import chart, table

    print(table(summary))
    print(f"written {out}/summary.json, {chart(runs, per_phase, phases, summary, str(out / 'throughput.png'))}")
    print(json.dumps({k: summary[k] for k in ("static_tokens_per_s", "adaptive_tokens_per_s", "switches",
                                              "loss_max_abs_diff")}))  # fmt: skip
    return 0


def _summarise(runs: dict, per_phase: int, phases: int, args, low: str, static, best_low, wall: float) -> dict:
    adaptive = runs["adaptive"]
    switches = [{"step": d["step"], "from": d["from"], "to": d["to"], "seconds": d["seconds"]}
                for d in adaptive["decisions"] if d.get("kind") == "switch"]  # fmt: skip
    summary = {"adaptive_tokens_per_s": _phase_stats(adaptive["steps"], per_phase, phases), "switches": switches,
               "static_tokens_per_s": {}, "loss_max_abs_diff": None, "static_layout": static.name,
               "best_low_layout": best_low.name, "peak": args.peak, "low": low, "steps_per_phase": per_phase,
               "wall_s": wall, "load_avg": os.getloadavg()}  # fmt: skip
    if "static" in runs:
        static_steps = runs["static"]["steps"]
        summary["static_tokens_per_s"] = _phase_stats(static_steps, per_phase, phases)
        by_step = {r["step"]: r["loss"] for r in static_steps}
        diffs = [abs(r["loss"] - by_step[r["step"]]) for r in adaptive["steps"] if r["step"] in by_step]
        summary["loss_max_abs_diff"] = max(diffs) if diffs else None
        summary["speedup"] = {k: v / summary["static_tokens_per_s"][k]
                              for k, v in summary["adaptive_tokens_per_s"].items()
                              if k in summary["static_tokens_per_s"]}  # fmt: skip
    if "static-low-best" in runs:
        summary["best_low_tokens_per_s"] = _phase_stats(runs["static-low-best"]["steps"], per_phase, phases)
    return summary
