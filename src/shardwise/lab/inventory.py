"""What lab fabrics exist on this host (live or left over), and removing the leftovers.

A fabric is live while its owner holds an flock on <lock dir>/<id>.lock; a fabric whose lock file is missing
or unlocked (owner gone, sentinel not finished or killed too, namespaces made by hand) is a leftover.
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass, field

from . import reaper, system


@dataclass
class FabricInfo:
    """One fabric found on the host: id, its namespaces, live (owner still holds it), addresses and link rates
    ({"namespace/device": "100Mbit"}) per namespace, and the number of processes inside its namespaces."""

    id: str
    namespaces: list[str]
    live: bool
    addresses: dict[str, list[str]] = field(default_factory=dict)
    rates: dict[str, str] = field(default_factory=dict)
    processes: int = 0


def _is_live(fid: str) -> bool:
    path = system.lock_dir() / f"{fid}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def list_fabrics() -> list[FabricInfo]:
    """Every fabric with a namespace on this host, by id."""
    by_id: dict[str, list[str]] = {}
    for ns in system.namespaces():
        by_id.setdefault(system.fabric_id(ns), []).append(ns)
    out = []
    for fid, names in sorted(by_id.items()):
        info = FabricInfo(fid, names, _is_live(fid))
        for ns in names:
            info.addresses[ns] = system.addresses(ns)
            qdiscs = system.run(["tc", "-n", ns, "qdisc", "show"], check=False).stdout
            for dev, rate in re.findall(r"qdisc tbf \S+ dev (\S+) root .*?rate (\S+)", qdiscs):
                info.rates[f"{ns}/{dev}"] = rate
            info.processes += len(system.run(["ip", "netns", "pids", ns], check=False).stdout.split())
        out.append(info)
    return out


def clean(include_live: bool = False) -> list[str]:
    """Remove every left-over lab namespace (killing processes inside); with include_live also the fabrics still
    held by a running owner (their owners will then fail). Returns the namespaces removed."""
    system.require_privileges()
    removed = []
    for info in list_fabrics():
        if info.live and not include_live:
            continue
        removed += reaper.delete_namespaces(system.tool("ip"), info.namespaces)
        if not info.live:
            (system.lock_dir() / f"{info.id}.lock").unlink(missing_ok=True)
    # lock files whose fabric is gone entirely (an owner killed after its namespaces were deleted)
    for path in system.lock_dir().glob("*.lock"):
        if path.stem != "alloc" and not _is_live(path.stem):
            path.unlink(missing_ok=True)
    return removed
