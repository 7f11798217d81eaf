"""The fabric lab: a real torchrun job across emulated nodes, shaping in both directions, cleanup in every way out.

Needs root (CAP_NET_ADMIN) to create network namespaces; CI and the dev machines run as root.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from shardwise.commands.cli import main as cli_main
from shardwise.lab import Fabric, LabError, list_fabrics

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN)")

RATE = "50mbit"


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def qdisc(ns: str, dev: str) -> str:
    return subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def counters(ns: str, dev: str) -> tuple[int, int]:
    """(bytes sent, overlimits) of the tbf on dev: overlimits counts packets the shaper had to hold back."""
    m = re.search(r"Sent (\d+) bytes \d+ pkt \(dropped \d+, overlimits (\d+)", qdisc(ns, dev))
    return int(m.group(1)), int(m.group(2))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def fab():
    with Fabric(nodes=2, rate=RATE) as f:
        yield f


JOB = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
keys = ("GROUP_RANK", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "SHARDWISE_LAB_NODES", "SHARDWISE_LAB_PROCS_PER_NODE",
        "SHARDWISE_LAB_RATE", "EXTRA")
print("RESULT", rank, world, t.item(), *(os.environ.get(k) for k in keys), flush=True)
dist.destroy_process_group()
"""


def test_torchrun_job_all_reduces_across_nodes_and_the_rate_changes_mid_job(fab, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    res = fab.torchrun(["python", str(script)], procs_per_node=1, env={"EXTRA": "x"}, timeout_s=120,
                       rate_at=[(0.5, "40mbit")])  # fmt: skip
    assert res.ok, res.logs
    rows = sorted(line.split()[1:] for log in res.logs for line in log.splitlines() if line.startswith("RESULT"))
    # two nodes, one rank each: ranks 0 and 1, sum of (rank + 1) = 3, node index GROUP_RANK 0 and 1
    assert rows == [[str(r), "2", "3.0", str(r), "lab0", "1", "2", "1", RATE, "x"] for r in (0, 1)], rows
    assert [r for _, r in res.rate_changes] == ["40mbit"] and fab.rate == "40mbit"
    for ns, dev in fab.links:  # the mid-job change reached every queue, both directions
        assert "rate 40Mbit" in qdisc(ns, dev), (ns, dev)
    fab.set_rate(RATE)


SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", 7000)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0
while data := c.recv(1 << 16):
    n += len(data)
c.sendall(str(n).encode()); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=20); c.sendall(b"x" * (1 << 20))
c.shutdown(socket.SHUT_WR); print(c.recv(64).decode())
"""


def send_mib(fab, src: int, dst: int) -> None:
    """1 MiB over TCP from node src to node dst."""
    server = fab.popen(dst, [sys.executable, "-I", "-S", "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = fab.exec(src, [sys.executable, "-I", "-S", "-c", CLIENT, fab.addresses[dst]], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
        assert out.stdout.strip() == str(1 << 20), out.stderr
    finally:
        server.kill()
        server.wait()


def test_shaping_both_directions_and_set_rate(fab):
    sw = fab.switch_namespace
    for ns, dev in fab.links:
        assert "tbf" in qdisc(ns, dev) and "rate 50Mbit" in qdisc(ns, dev), (ns, dev)
    # traffic node0 -> node1 leaves through node0's upload tbf and reaches node1 through its download tbf (the
    # switch-side port): both must have carried the MiB. The upload tbf also held packets back (overlimits: TCP
    # sends faster than 50mbit); the download one sees traffic already paced to its rate, so it need not.
    for src, dst in ((0, 1), (1, 0)):
        up, down = (fab.namespaces[src], "lab0"), (sw, f"node{dst}")
        (up0, over0), (down0, _) = counters(*up), counters(*down)
        send_mib(fab, src, dst)
        (up1, over1), (down1, _) = counters(*up), counters(*down)
        assert up1 - up0 >= 1 << 20 and over1 > over0, (up, up0, up1, over0, over1)
        assert down1 - down0 >= 1 << 20, (down, down0, down1)
    fab.set_rate("200mbit")
    for ns, dev in fab.links:
        assert "rate 200Mbit" in qdisc(ns, dev), (ns, dev)
    fab.set_rate(None)
    for ns, dev in fab.links:
        assert "tbf" not in qdisc(ns, dev), (ns, dev)
    fab.set_rate(RATE)
    for ns, dev in fab.links:
        assert "rate 50Mbit" in qdisc(ns, dev), (ns, dev)


def test_cleanup_on_exception_kills_processes_inside():
    with pytest.raises(RuntimeError, match="boom"):
        with Fabric(nodes=1, rate="10mbit") as f:
            names = {*f.namespaces, f.switch_namespace}
            assert names <= netns()
            sleeper = f.popen(0, ["sleep", "60"])
            raise RuntimeError("boom")
    assert not names & netns()
    sleeper.wait(timeout=5)  # killed with its namespace
    assert f.id not in {info.id for info in list_fabrics()}


CHILD = """
import sys, time
from shardwise.lab import Fabric
fab = Fabric(nodes=1, rate="10mbit").open()
sleeper = fab.popen(0, ["sleep", "60"])
print(fab.switch_namespace, *fab.namespaces, sleeper.pid, flush=True)
time.sleep(60)
"""


def test_sigkilled_owner_is_cleaned_up_by_the_sentinel():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        *names, pid = child.stdout.readline().split()
        assert names and set(names) <= netns() and alive(int(pid))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
        deadline = time.monotonic() + 10
        while (set(names) & netns() or alive(int(pid))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not set(names) & netns(), "the sentinel did not remove the killed owner's namespaces"
        assert not alive(int(pid)), "a process inside the killed owner's namespace survived"
    finally:
        child.kill()
        child.wait()


def test_lab_clean_removes_leftovers_and_spares_live_fabrics(fab, capsys):
    leftover = f"swlab-test{os.getpid()}-n0"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", leftover, "sleep", "60"])
    time.sleep(0.2)  # let it enter the namespace
    try:
        assert cli_main(["lab", "show"]) == 0
        shown = capsys.readouterr().out
        assert leftover in shown and f"fabric {fab.id}: live" in shown
        assert cli_main(["lab", "clean"]) == 0
        assert leftover not in netns()
        sleeper.wait(timeout=5)
        assert {*fab.namespaces, fab.switch_namespace} <= netns()  # a live fabric is not a leftover
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)
        sleeper.kill()
        sleeper.wait()


def test_bad_input_is_refused_before_anything_is_created(fab, tmp_path):
    before = netns()
    for kwargs, match in (({"nodes": 0}, "nodes must be an integer from 1"),
                          ({"nodes": 2, "rate": "fast"}, "link rate 'fast' is not understood"),
                          ({"nodes": 2, "rate": "100mbps"}, "byte units"),
                          ({"nodes": 2, "rate": "10kbit"}, "minimum of 100kbit")):  # fmt: skip
        with pytest.raises(LabError, match=match):
            Fabric(**kwargs)
    with pytest.raises(SystemExit):
        cli_main(["lab", "run", "--rate", "fast", "--", "python", "x.py"])
    with pytest.raises(SystemExit):
        cli_main(["lab", "run", "--rate-at", "soon:1mbit", "--", "python", "x.py"])
    with pytest.raises(LabError, match="procs_per_node"):
        fab.torchrun(["python", "x.py"], procs_per_node=0)
    with pytest.raises(LabError, match="needs a script"):
        fab.torchrun(["python"])
    with pytest.raises(LabError, match="link rate"):
        fab.set_rate("quick")
    assert netns() == before
    assert fab.rate == RATE
