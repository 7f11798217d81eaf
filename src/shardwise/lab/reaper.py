"""Removing lab namespaces, and the sentinel that does it when the fabric's owner dies without cleaning up.

This file imports only the standard library and nothing of shardwise: the sentinel runs it as a script
(``python -I -S reaper.py ...``) so that it starts in milliseconds, without torch, in its own session.

Deleting a namespace removes its veths (and so their peers in the switch namespace), the bridge and every qdisc
with it. A namespace with processes still inside survives its `ip netns del` invisibly, links and all, so the
processes are killed first.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


def _ip(ip: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ip, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def kill_namespace_processes(ip: str, namespace: str) -> list[int]:
    """SIGKILL every process inside `namespace` (twice over, for ones forked meanwhile); returns the pids."""
    killed: list[int] = []
    for _ in range(3):
        res = _ip(ip, "netns", "pids", namespace)
        pids = [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return killed


def delete_namespaces(ip: str, names: list[str]) -> list[str]:
    """Kill the processes in, then delete, each namespace that exists; returns the ones deleted."""
    existing = set(_ip(ip, "netns", "list").stdout.split())
    deleted = []
    for name in names:
        if name not in existing:
            continue
        kill_namespace_processes(ip, name)
        if _ip(ip, "netns", "del", name).returncode == 0:
            deleted.append(name)
    return deleted


def sentinel_main(argv: list[str]) -> int:
    """argv: OWNER_PID IP LOCKFILE NAMESPACE...; stdin: a pipe whose write end only the owner holds.

    Waits until the owner writes 'done' (it cleaned up itself: exit quietly) or the pipe closes / the owner is
    gone (it died, e.g. SIGKILL: delete its namespaces and lock file). The owner's pid is polled too because a
    child the owner forked (not exec'd) inherits the write end and would keep the pipe open after the owner dies.
    """
    owner, ip, lockfile, names = int(argv[0]), argv[1], argv[2], argv[3:]
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's Ctrl-C or hang-up must not stop the cleanup
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.5)
        if ready:
            chunk = os.read(0, 64)
            buf += chunk
            if b"done" in buf:
                return 0
            if not chunk:
                break  # EOF: the owner died
        elif os.getppid() != owner:
            break  # re-parented: the owner died while a forked child holds the pipe
    delete_namespaces(ip, names)
    try:
        os.unlink(lockfile)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(sentinel_main(sys.argv[1:]))
