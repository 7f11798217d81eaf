"""The host side of the lab: errors, the `ip`/`tc` binaries, privileges, link rates and tbf parameters.

Everything the lab does to the kernel goes through `ip` and `tc` (iproute2) run as subprocesses, never through
the root namespace's own links: the lab only creates namespaces named ``swlab-*`` and links inside them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PREFIX = "swlab-"  # every namespace the lab creates starts with this; `shardwise lab clean` removes them
SUBNET = "10.213"  # each fabric owns one free 10.213.K.0/24
NODE_IF = "lab0"  # the node's end of its veth, inside the node's namespace (names are per namespace)
BRIDGE = "br0"  # the bridge inside the switch namespace


class LabError(RuntimeError):
    """The lab could not do what was asked: the message names the cause and the fix."""


class LabConfigError(LabError, ValueError):
    """Bad input to the lab (node count, rate string, ...), refused before anything is created."""


def tool(name: str) -> str:
    """Absolute path of `ip` or `tc`; /usr/sbin and /sbin are searched too (often not on a user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise LabError(f"the lab needs the `{name}` command from iproute2, which was not found: install it "
                       "(Debian/Ubuntu: apt-get install iproute2; Fedora: dnf install iproute iproute-tc)")  # fmt: skip
    return found


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run an ip/tc command (argv[0] a tool name), capturing text output; LabError with its stderr if it fails."""
    argv = [tool(argv[0]), *argv[1:]]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from exc
    if check and res.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def require_privileges() -> None:
    """Raise LabError naming the fix unless this process may create network namespaces.

    Root normally can; a non-root process might hold CAP_NET_ADMIN + CAP_SYS_ADMIN, so it is probed with a real
    (immediately deleted) namespace instead of refused on its uid alone.
    """
    tool("ip"), tool("tc")
    if os.geteuid() == 0:
        return
    probe = f"{PREFIX}probe-{os.getpid()}"
    res = run(["ip", "netns", "add", probe], check=False)
    if res.returncode == 0:
        run(["ip", "netns", "del", probe], check=False)
        return
    raise LabError("the lab needs root (CAP_NET_ADMIN) to create network namespaces: run as root, or as "
                   f"`sudo -E $(which python) ...` / `sudo -E $(which shardwise) lab ...` (ip said: "
                   f"{res.stderr.strip() or 'permission denied'})")  # fmt: skip


def namespaces() -> list[str]:
    """Names of every lab namespace on this host (ours and anyone else's), sorted."""
    out = run(["ip", "netns", "list"]).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(PREFIX))


def fabric_id(namespace: str) -> str:
    """The fabric a lab namespace belongs to: swlab-<id>-n0 -> <id> (a hand-made swlab-x is its own fabric)."""
    rest = namespace[len(PREFIX) :]
    return rest.rsplit("-", 1)[0] if "-" in rest else rest


def addresses(namespace: str) -> list[str]:
    """IPv4 addresses (without prefix length) configured in a namespace; [] if it vanished meanwhile."""
    res = run(["ip", "-n", namespace, "-4", "-o", "addr", "show"], check=False)
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", res.stdout)


def lock_dir() -> Path:
    """Where live fabrics keep their lock files (tmpfs /run when writable, else the temp dir)."""
    for base in (Path("/run"), Path(tempfile.gettempdir())):
        d = base / "shardwise-lab"
        try:
            d.mkdir(mode=0o755, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise LabError("no writable folder for the lab's lock files (/run/shardwise-lab or $TMPDIR/shardwise-lab)")


_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
MIN_RATE = 100_000  # bits/s; below this tbf's burst (>= one MTU) dominates and the "rate" means little


def parse_rate(rate: str | None) -> int | None:
    """'100mbit' -> 100_000_000 (bits/s); None / 'unshaped' / 'none' -> None (no shaping).

    Only tc's bit units are accepted: tc reads 'mbps' as megaBYTES per second, an easy 8x mistake, so it is refused.
    """
    if rate is None or str(rate).strip().lower() in ("unshaped", "none", ""):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", str(rate).lower())
    if not m or m.group(2) not in _UNITS:
        raise LabConfigError(f"link rate {rate!r} is not understood: write a number and a bit unit, e.g. 500kbit, "
                             "100mbit, 1gbit (or 'unshaped'); byte units like 'mbps' are refused on purpose",
                             )  # fmt: skip
    bits = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bits < MIN_RATE:
        raise LabConfigError(f"link rate {rate!r} is below the lab's minimum of 100kbit: use a rate >= 100kbit")
    return bits


def format_rate(bits: int | None) -> str:
    """100_000_000 -> '100mbit' (exact when possible); None -> 'unshaped'."""
    if bits is None:
        return "unshaped"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bits % _UNITS[unit] == 0:
            return f"{bits // _UNITS[unit]}{unit}"
    return f"{bits}bit"


def tbf_args(bits: int) -> list[str]:
    """tc arguments of a tbf shaping to `bits` bits/s.

    burst: at least 32 KiB (several MTUs) and 4 ms of traffic at the rate, so that the kernel's timer granularity
    does not cap fast rates below the target; latency 50 ms bounds the queue (TCP sees drops past it, as on a
    real congested link). The cost of a token bucket: after an idle gap a message smaller than the burst passes
    at the veth's own speed (100mbit: a 64 KiB all-reduce after a 30 ms gap took 2.2 ms, theory 5.2, back to back
    5.0), so tensor parallelism's small spaced messages see a faster link than a back-to-back calibration does.
    A 1 ms burst removes that but made gloo's TCP flows far slower than the rate in a real step (1gbit, tp=2
    GPT step: 715 ms vs 157 unshaped and 164 with 4 ms), so 4 ms stays and bench/PLANNER.md names the effect.
    """
    burst = max(32 * 1024, bits // 8 // 250)
    return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "50ms"]
