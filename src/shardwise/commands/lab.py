"""`shardwise lab run | clean | show | adaptive`: the fabric lab from the command line (adaptive: lab_adaptive.py)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> None:
    lab = sub.add_parser(
        "lab",
        help="emulate N nodes on this host (network namespaces, tc-shaped links) and run torchrun jobs on them",
        description="The fabric lab: one network namespace per node joined by a bridge, each node's link shaped "
        "with tc in both directions. Needs root (CAP_NET_ADMIN).",
    )
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    run = lsub.add_parser(
        "run",
        help="run a command as one torchrun job across emulated nodes",
        description="Create a fabric, run `python -m torch.distributed.run` in every node's namespace with a c10d "
        "rendezvous on node 0, print every node's output prefixed [node i], remove the fabric. Exit status: 0 when "
        "every node exits 0. Example: shardwise lab run --nodes 2 --procs-per-node 2 --rate 500mbit -- python "
        "train.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--nodes", type=int, default=2, help="emulated nodes")
    run.add_argument("--procs-per-node", type=int, default=1, help="ranks per node (torchrun --nproc-per-node)")
    run.add_argument("--rate", default="unshaped", help="link rate of every node, both directions: 500kbit, "
                     "100mbit, 1gbit, or unshaped")  # fmt: skip
    run.add_argument("--rate-at", action="append", default=[], metavar="SECONDS:RATE",
                     help="change the rate SECONDS after the start (repeatable): 5:100mbit, 10:unshaped")  # fmt: skip
    run.add_argument("--timeout", type=float, default=3600.0, help="kill every node after this many seconds")
    run.add_argument("--grace", type=float, default=5.0, help="when a node fails, seconds the others get to stop")
    # dest "program": "command" is the top-level parser's subcommand dest
    run.add_argument("program", nargs=argparse.REMAINDER, help="-- python script.py ARGS (or any program)")
    clean = lsub.add_parser("clean", help="remove left-over lab namespaces (swlab-*) and their processes")
    clean.add_argument("--all", action="store_true", help="also remove fabrics a running lab still owns")
    lsub.add_parser("show", help="list the lab fabrics on this host: namespaces, addresses, rates, processes")
    from .lab_adaptive import add_parser as add_adaptive

    add_adaptive(lsub)


def _rate_schedule(parser, items: list[str]) -> list[tuple[float, str | None]]:
    from shardwise.lab import LabError, parse_rate

    out = []
    for item in items:
        when, sep, rate = item.partition(":")
        try:
            t = float(when)
            if not sep or t < 0:
                raise ValueError
        except ValueError:
            parser.error(f"--rate-at {item!r}: write SECONDS:RATE with SECONDS >= 0, e.g. 5:100mbit")
        try:
            parse_rate(rate)
        except LabError as exc:
            parser.error(f"--rate-at {item!r}: {exc}")
        out.append((t, rate))
    return out


def _run(parser, args) -> int:
    from shardwise.lab import Fabric, LabError

    command = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        parser.error("lab run needs a command after --, e.g. shardwise lab run --nodes 2 -- python train.py")
    if args.procs_per_node < 1:
        parser.error(f"--procs-per-node must be >= 1, got {args.procs_per_node}")
    schedule = _rate_schedule(parser, args.rate_at)
    env = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]} if "OMP_NUM_THREADS" in os.environ else {}
    try:
        fab = Fabric(nodes=args.nodes, rate=args.rate)
    except LabError as exc:
        parser.error(str(exc))
    try:
        with fab:
            print(f"lab {fab.id}: {fab.nodes} nodes x {args.procs_per_node} procs on {fab.subnet}, "
                  f"rate {fab.rate or 'unshaped'}", flush=True)  # fmt: skip
            res = fab.torchrun(command, args.procs_per_node, env, args.timeout, rate_at=schedule, echo=True,
                               grace_s=args.grace)  # fmt: skip
    except LabError as exc:
        print(f"shardwise lab: error: {exc}", file=sys.stderr)
        return 1
    for t, rate in res.rate_changes:
        print(f"lab: rate -> {rate or 'unshaped'} at {t:.1f} s")
    codes = ", ".join(f"node{i} exit {rc}" for i, rc in enumerate(res.returncodes))
    print(f"lab: {codes}; {res.wall_s:.1f} s")
    return 0 if res.ok else 1


def main(parser, args) -> int:
    from shardwise.lab import LabError, clean, list_fabrics

    if args.lab_command == "run":
        return _run(parser, args)
    if args.lab_command == "adaptive":
        from .lab_adaptive import run

        return run(args)
    try:
        if args.lab_command == "clean":
            removed = clean(include_live=args.all)
            print(f"removed {len(removed)} namespaces" + (": " + " ".join(removed) if removed else ""))
            return 0
        fabrics = list_fabrics()
    except LabError as exc:
        print(f"shardwise lab: error: {exc}", file=sys.stderr)
        return 1
    if not fabrics:
        print("no lab fabrics on this host")
    for info in fabrics:
        state = "live" if info.live else "left over (shardwise lab clean removes it)"
        print(f"fabric {info.id}: {state}, {info.processes} processes")
        for ns in info.namespaces:
            addrs = [a for a in info.addresses.get(ns, []) if not a.startswith("127.")]
            rates = [f"{key.split('/', 1)[1]} {rate}" for key, rate in info.rates.items() if key.startswith(ns + "/")]
            print(f"  {ns:24s} {' '.join(addrs) or '-':16s} {', '.join(rates) or 'unshaped'}")
    return 0
