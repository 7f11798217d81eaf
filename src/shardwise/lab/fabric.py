"""An emulated multi-node fabric: one network namespace per node, a switch namespace, shaped links.

    node namespace swlab-<id>-n<i>            switch namespace swlab-<id>-sw
      lo (up: ranks of one node talk here)
      lab0  10.213.K.(i+1)/24  <--- veth --->  node<i> ---+
        tbf: node i's upload                  tbf: node i's download
                                                          br0 (bridge joining every node<i>)

Nothing is done to the root namespace's links: the switch lives in its own namespace. Each fabric has a unique
id (names swlab-<id>-*) and a free subnet 10.213.K.0/24, and removes everything it made on exit, exception,
SIGINT/SIGTERM, or, through a sentinel process, when its owner is SIGKILLed.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import reaper, system
from .system import BRIDGE, NODE_IF, PREFIX, SUBNET, LabConfigError, LabError

MAX_NODES = 64


class Fabric:
    """`with Fabric(nodes=2, rate="100mbit") as fab:` N emulated nodes joined by links shaped to `rate`.

    rate: tc bit units ('500kbit', '100mbit', '1gbit') or None for unshaped links; applied to both directions
    of every node's link. Attributes once open: namespaces[i] and addresses[i] of node i, switch_namespace,
    interface (the node-side device, for GLOO_SOCKET_IFNAME), links [(namespace, device)] that are shaped.
    """

    def __init__(self, nodes: int = 2, rate: str | None = None):
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
            raise LabConfigError(f"nodes must be an integer from 1 to {MAX_NODES}, got {nodes!r}")
        self._bits = system.parse_rate(rate)  # validated here, before anything exists
        self.nodes = nodes
        self.id: str | None = None
        self.namespaces: list[str] = []
        self.addresses: list[str] = []
        self.switch_namespace: str | None = None
        self.interface = NODE_IF
        self.subnet: str | None = None
        self._state = "new"  # new -> open -> closed
        self._sentinel: subprocess.Popen | None = None
        self._sentinel_w: int | None = None
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._saved_handlers: dict[int, object] = {}
        self._jobs = 0

    @property
    def rate(self) -> str | None:
        """The current rate of every link in tc units ('100mbit'), None when unshaped."""
        return None if self._bits is None else system.format_rate(self._bits)

    @property
    def links(self) -> list[tuple[str, str]]:
        """(namespace, device) of every shaped queue: node i's upload (lab0 in its namespace) and download
        (node<i> in the switch namespace), for each node."""
        out = []
        for i, ns in enumerate(self.namespaces):
            out += [(ns, NODE_IF), (self.switch_namespace, f"node{i}")]
        return out

    # ---- life cycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> Fabric:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> Fabric:
        """Create the namespaces, links and shaping; LabError (naming the fix) if this host cannot."""
        if self._state != "new":
            raise LabError("a Fabric can be opened once: make a new Fabric(...)")
        system.require_privileges()
        locks = system.lock_dir()
        self._state = "open"
        try:
            with _Flock(locks / "alloc.lock"):  # two fabrics starting at once must not pick the same id/subnet
                self._allocate(locks)
                self._start_sentinel()
                self._install_signal_handlers()
                atexit.register(self.close)
                self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _allocate(self, locks: Path) -> None:
        existing = system.namespaces()
        taken_ids = {system.fabric_id(n) for n in existing} | {p.stem for p in locks.glob("*.lock")}
        self.id = next(i for i in iter(lambda: secrets.token_hex(3), None) if i not in taken_ids)
        used = set()
        for ns in existing:
            used |= {int(a.split(".")[2]) for a in system.addresses(ns) if a.startswith(SUBNET + ".")}
        free = [k for k in range(1, 255) if k not in used]
        if not free:
            raise LabError(f"every {SUBNET}.K.0/24 subnet is in use by lab namespaces: `shardwise lab clean`")
        k = free[0]
        self.subnet = f"{SUBNET}.{k}.0/24"
        self.namespaces = [f"{PREFIX}{self.id}-n{i}" for i in range(self.nodes)]
        self.addresses = [f"{SUBNET}.{k}.{i + 1}" for i in range(self.nodes)]
        self.switch_namespace = f"{PREFIX}{self.id}-sw"
        self._lock_path = locks / f"{self.id}.lock"
        # held for the fabric's life: `lab clean` skips fabrics whose lock is held (live), removes the rest
        self._lock_fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

    def _start_sentinel(self) -> None:
        r, w = os.pipe()  # non-inheritable: only this process holds the write end
        argv = [sys.executable, "-I", "-S", reaper.__file__, str(os.getpid()), system.tool("ip"),
                str(self._lock_path), *self.namespaces, self.switch_namespace]  # fmt: skip
        try:
            self._sentinel = subprocess.Popen(argv, stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True)  # fmt: skip
        finally:
            os.close(r)
        self._sentinel_w = w

    def _build(self) -> None:
        sw = self.switch_namespace
        system.run(["ip", "netns", "add", sw])
        system.run(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"])
        for dev in (BRIDGE, "lo"):
            system.run(["ip", "-n", sw, "link", "set", dev, "up"])
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            port = f"node{i}"
            system.run(["ip", "netns", "add", ns])
            # created inside the namespaces directly: the root namespace never sees these links
            system.run(["ip", "-n", ns, "link", "add", NODE_IF, "type", "veth", "peer", "name", port, "netns", sw])
            system.run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE])
            system.run(["ip", "-n", sw, "link", "set", port, "up"])
            system.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IF])
            for dev in (NODE_IF, "lo"):
                system.run(["ip", "-n", ns, "link", "set", dev, "up"])
        if self._bits is not None:
            for ns, dev in self.links:
                system.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *system.tbf_args(self._bits)])

    def close(self) -> None:
        """Remove every namespace (and so link and qdisc) of this fabric, killing processes left inside. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            if self.namespaces:
                reaper.delete_namespaces(system.tool("ip"), [*self.namespaces, self.switch_namespace])
            if self._sentinel is not None:
                try:
                    os.write(self._sentinel_w, b"done")
                except OSError:
                    pass
                os.close(self._sentinel_w)
                try:
                    self._sentinel.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._sentinel.kill()
            if self._lock_fd is not None:
                try:
                    os.unlink(self._lock_path)
                except OSError:
                    pass
                os.close(self._lock_fd)
        finally:
            self._restore_signal_handlers()
            atexit.unregister(self.close)

    # ---- signals: SIGINT / SIGTERM unwind through close() instead of killing the process mid-fabric ----------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread; the sentinel still covers this fabric
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if self._state == "closed":
            return  # a second Ctrl-C during cleanup must not interrupt it
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    # ---- using the fabric --------------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._state != "open":
            raise LabError(f"the fabric is {self._state}: use it inside `with Fabric(...) as fab:`")

    def _namespace(self, node: int) -> str:
        self._require_open()
        if not isinstance(node, int) or not 0 <= node < self.nodes:
            raise LabConfigError(f"node must be an integer from 0 to {self.nodes - 1}, got {node!r}")
        return self.namespaces[node]

    def set_rate(self, rate: str | None) -> None:
        """Change both directions of every node's link to `rate` (None: remove the shaping), also mid-job."""
        bits = system.parse_rate(rate)
        self._require_open()
        for ns, dev in self.links:
            if bits is None:
                if self._bits is not None:
                    system.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])
            else:
                verb = "add" if self._bits is None else "change"
                system.run(["tc", "-n", ns, "qdisc", verb, "dev", dev, "root", *system.tbf_args(bits)])
        self._bits = bits

    def exec(self, node: int, argv: Sequence[str], *, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside node `node`'s namespace (keyword arguments as subprocess.run's)."""
        return subprocess.run([system.tool("ip"), "netns", "exec", self._namespace(node), *argv], timeout=timeout,
                              **kwargs)  # fmt: skip

    def popen(self, node: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen(argv) inside node `node`'s namespace; killed at close() if still running."""
        return subprocess.Popen([system.tool("ip"), "netns", "exec", self._namespace(node), *argv], **kwargs)

    def torchrun(self, argv: Sequence[str], procs_per_node: int = 1, env: dict[str, str] | None = None,
                 timeout_s: float = 300.0, *, rate_at: Sequence[tuple[float, str | None]] = (), echo: bool = False,
                 grace_s: float = 5.0, on_tick=None):  # fmt: skip
        """Run `argv` (e.g. ["python", "train.py", "--x", "1"]) as one torchrun job across every node.

        procs_per_node ranks per node; env added to each node's environment; rate_at [(seconds, rate)] changes
        the link rate at those times after the start; echo prints every node's output live, prefixed [node i].
        Returns a LabResult (returncodes, logs, ok); raises LabError after killing every node on timeout.
        When a node fails, the others get grace_s seconds to stop on their own, then are killed.
        on_tick(seconds since start) is called every ~50 ms while the job runs (it may call set_rate: a rate
        schedule driven by the job's progress rather than the clock; such changes are recorded too).
        """
        from .runner import run_job

        self._require_open()
        self._jobs += 1
        return run_job(self, list(argv), procs_per_node, dict(env or {}), timeout_s, rate_at=rate_at, echo=echo,
                       grace_s=grace_s, job_index=self._jobs, on_tick=on_tick)  # fmt: skip


class _Flock:
    """An exclusive flock on `path` for a with-block (waits at most 30 s, then LabError)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import time

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise LabError(f"another lab process holds {self.path} for over 30 s") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        os.close(self.fd)
