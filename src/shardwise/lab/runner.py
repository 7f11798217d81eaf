"""One torchrun job across a Fabric's nodes: start, watch, change rates, stop every node together.

Each node runs `python -m torch.distributed.run` (this interpreter's torch) inside its namespace with a c10d
rendezvous hosted by node 0. torchrun alone would leave the surviving nodes waiting out rendezvous/collective
timeouts (minutes) when one node dies, so the job is watched as a whole: a failed node gives the others grace_s
to stop, then every node's process tree is killed; so is the whole job on timeout.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import system
from .system import LabConfigError, LabError

# set by an enclosing torchrun (if this process runs under one): they must not leak into the nodes' torchrun
_TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}  # fmt: skip


@dataclass
class LabResult:
    """returncodes[i] / logs[i]: node i's torchrun exit status and combined stdout+stderr; wall_s: seconds from
    start to the last node's exit; rate_changes: [(seconds after start, rate or None)] applied during the job."""

    returncodes: list[int]
    logs: list[str]
    wall_s: float
    rate_changes: list[tuple[float, str | None]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def script_args(argv: list[str]) -> list[str]:
    """What follows torchrun's own flags: ["python", "x.py", "a"] -> ["x.py", "a"]; ["python", "-m", "m"] ->
    ["-m", "m"]; any other program -> ["--no-python", program, ...] (torchrun runs it as is)."""
    if not argv:
        raise LabConfigError("torchrun needs a command, e.g. ['python', 'train.py']")
    if re.fullmatch(r"python[0-9.]*", Path(argv[0]).name) or argv[0] == sys.executable:
        rest = [a for a in argv[1:] if a != "-u"]  # torchrun already runs its workers unbuffered
        if not rest:
            raise LabConfigError(f"{argv[0]} needs a script or -m module to run under torchrun")
        if rest[0] == "-m":
            if len(rest) < 2:
                raise LabConfigError("python -m needs a module name")
            return rest
        if rest[0].startswith("-"):
            raise LabConfigError(f"python option {rest[0]!r} cannot be passed through torchrun: only a script "
                                 "or -m module (use env for interpreter settings)")  # fmt: skip
        return rest
    return ["--no-python", *argv]


def _free_port(fab, node: int) -> int:
    """A TCP port free on `node` (inside its namespace), for the rendezvous store."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    res = fab.exec(node, [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise LabError(f"could not pick a free port in {fab.namespaces[node]}: {res.stderr.strip()}")
    return int(res.stdout)


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _stop(procs: list[subprocess.Popen], wait_s: float = 3.0) -> None:
    """SIGTERM each running node's torchrun (it stops its workers), then SIGKILL whatever is left of the trees."""
    running = [p for p in procs if p.poll() is None]
    trees = {p.pid: _descendants(p.pid) for p in running}
    for p in running:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in running:
        for pid in trees[p.pid] + _descendants(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        p.wait(timeout=10)


class _Echo:
    """Prints the new complete lines of each node's log, prefixed [node i]."""

    def __init__(self, paths: list[Path]):
        self.paths, self.offsets, self.partial = paths, [0] * len(paths), [""] * len(paths)

    def __call__(self, final: bool = False) -> None:
        for i, path in enumerate(self.paths):
            with open(path, "rb") as f:
                f.seek(self.offsets[i])
                data = f.read()
            self.offsets[i] += len(data)
            lines = (self.partial[i] + data.decode(errors="replace")).split("\n")
            self.partial[i] = "" if final else lines.pop()
            for line in lines:
                if line or not final:
                    print(f"[node{i}] {line}", flush=True)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def run_job(fab, argv: list[str], procs_per_node: int, env: dict[str, str], timeout_s: float, *,
            rate_at: Sequence[tuple[float, str | None]], echo: bool, grace_s: float, job_index: int,
            on_tick: Callable[[float], None] | None = None) -> LabResult:  # fmt: skip
    """Fabric.torchrun's body (see there)."""
    if isinstance(procs_per_node, bool) or not isinstance(procs_per_node, int) or procs_per_node < 1:
        raise LabConfigError(f"procs_per_node must be an integer >= 1, got {procs_per_node!r}")
    if not timeout_s > 0:
        raise LabConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
    schedule = sorted((float(t), r) for t, r in rate_at)
    for t, r in schedule:
        system.parse_rate(r)  # every scheduled rate is checked before the job starts
        if t < 0:
            raise LabConfigError(f"rate_at times are seconds after the start, >= 0: got {t}")
    tail = script_args(argv)
    port = _free_port(fab, 0)
    rdzv_id = f"{fab.id}-{job_index}-{secrets.token_hex(2)}"
    inherited = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    base_env = {**inherited, **env, "GLOO_SOCKET_IFNAME": fab.interface, "PYTHONUNBUFFERED": "1",
                "SHARDWISE_LAB_NODES": str(fab.nodes), "SHARDWISE_LAB_PROCS_PER_NODE": str(procs_per_node),
                "SHARDWISE_LAB_RATE": fab.rate or "unshaped", "SHARDWISE_LAB_ID": fab.id}  # fmt: skip
    base_env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    logdir = Path(tempfile.mkdtemp(prefix=f"swlab-{fab.id}-logs-"))
    paths = [logdir / f"node{i}.log" for i in range(fab.nodes)]
    procs: list[subprocess.Popen] = []
    changes: list[tuple[float, str | None]] = []
    start = time.monotonic()
    try:
        for i, addr in enumerate(fab.addresses):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(fab.nodes),
                   "--nproc-per-node", str(procs_per_node), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"{fab.addresses[0]}:{port}", "--rdzv-conf", f"is_host={int(i == 0)}",
                   "--local-addr", addr, "--rdzv-id", rdzv_id, "--max-restarts", "0", *tail]  # fmt: skip
            with open(paths[i], "wb") as log:  # a file, not a pipe: a chatty job cannot block on a full pipe
                # own session: a terminal's Ctrl-C reaches only us, and we stop the nodes in order
                node_env = {**base_env, "SHARDWISE_LAB_NODE": str(i)}
                procs.append(fab.popen(i, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=node_env, start_new_session=True))  # fmt: skip
        echo_fn = _Echo(paths) if echo else None
        failed_at = None
        while True:
            now = time.monotonic() - start
            while schedule and schedule[0][0] <= now:
                _, rate = schedule.pop(0)
                fab.set_rate(rate)
                changes.append((round(now, 3), fab.rate))
            if on_tick is not None:
                before = fab.rate
                on_tick(now)  # e.g. a rate change when the job's progress file reaches a step
                if fab.rate != before:
                    changes.append((round(now, 3), fab.rate))
            codes = [p.poll() for p in procs]
            if echo_fn:
                echo_fn()
            if all(c is not None for c in codes):
                break
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > grace_s:
                _stop(procs)  # the survivors would wait out the rendezvous / collective timeouts
                break
            if now > timeout_s:
                logs = [p.read_text(errors="replace") for p in paths]  # before the kill adds its own tracebacks
                _stop(procs)
                detail = "\n".join(f"  node{i}:\n{_tail(log)}" for i, log in enumerate(logs))
                raise LabError(f"the torchrun job did not finish within {timeout_s:.0f} s; every node was killed. "
                               f"Last lines of each node:\n{detail}")  # fmt: skip
            time.sleep(0.05)
        wall = time.monotonic() - start
        if echo_fn:
            echo_fn(final=True)
        logs = [p.read_text(errors="replace") for p in paths]
        return LabResult([p.returncode for p in procs], logs, wall, changes)
    finally:
        _stop(procs)  # no-op when all exited; on KeyboardInterrupt / errors it stops every node
        for p in paths:
            p.unlink(missing_ok=True)
        logdir.rmdir()
