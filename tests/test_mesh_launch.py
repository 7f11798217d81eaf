"""Mesh construction, the launcher's error handling, and running unchanged under torchrun."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardwise
from shardwise.nn import ParallelAttention, ParallelMLP

ROOT = Path(__file__).resolve().parent.parent


def grid_checks():
    with pytest.raises(ValueError, match=r"tp=3 does not divide the world size 4; use tp in \{1, 2, 4\}"):
        shardwise.init_mesh(3)
    with pytest.raises(ValueError, match="use dp=2 with tp=2"):
        shardwise.init_mesh(2, 1)
    mesh = shardwise.init_mesh(2, 2)
    assert (mesh.tp_size, mesh.dp_size, mesh.world_size) == (2, 2, 4)
    rank = dist.get_rank()
    assert (mesh.tp_rank, mesh.dp_rank) == (rank % 2, rank // 2)  # tp ranks adjacent
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mesh.tp_group)
    assert t.item() == {0: 1.0, 1: 5.0}[mesh.dp_rank]  # {0,1} and {2,3}
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mesh.dp_group)
    assert t.item() == {0: 2.0, 1: 4.0}[mesh.tp_rank]  # {0,2} and {1,3}
    # Asked again, the same grid comes back without new process groups; another grid says what to do.
    created = []
    new_group = dist.new_group
    dist.new_group = lambda *a, **k: created.append(a) or new_group(*a, **k)
    try:
        again = shardwise.init_mesh(2, 2)
        assert again is mesh and again.tp_group is mesh.tp_group and created == []
        with pytest.raises(ValueError, match=r"pass the existing mesh .*destroy_mesh\(\) on every rank first"):
            shardwise.init_mesh(4)
        assert shardwise.get_mesh() is mesh
        shardwise.mesh.destroy_mesh()
        wide = shardwise.init_mesh(4)
        assert created and (wide.tp_size, wide.dp_size) == (4, 1)
    finally:
        dist.new_group = new_group
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=wide.tp_group)
    assert t.item() == 6.0
    return os.getpid()


def test_mesh_grid_and_errors():
    pids = shardwise.launch(grid_checks, 4)
    assert len(set(pids)) == 4


def bad_model_checks():
    mesh = shardwise.init_mesh(4)
    # uneven head and ffn splits work (tests/test_models.py); what cannot be split says why
    with pytest.raises(ValueError, match="num_heads=3 cannot be split over tp=4 ranks: every rank needs"):
        ParallelAttention(48, 3, mesh=mesh)
    with pytest.raises(ValueError, match="num_heads=12 must be a positive multiple of num_kv_heads=5"):
        ParallelAttention(48, 12, 5, mesh=mesh)
    with pytest.raises(ValueError, match="out_features=3 cannot be split over tp=4 ranks"):
        ParallelMLP(16, 3, mesh=mesh)
    with pytest.raises(ValueError, match="tp group has 4 ranks"):
        ParallelMLP(16, 32, mesh=shardwise.Mesh(2, 0, 2, 0, tp_group=mesh.tp_group))
    with pytest.raises(ValueError, match="needs its process group"):
        ParallelMLP(16, 32, mesh=shardwise.Mesh(2, 0, 1, 0))
    # a layer of another tp feeding this one: the shard shapes disagree and say so
    mlp = ParallelMLP(16, 32, mesh=mesh)
    with pytest.raises(ValueError, match=r"expected this rank's input shard \[..., 8\]"):
        mlp.down(torch.randn(2, 16))
    return True


def test_bad_model_configs_raise():
    assert all(shardwise.launch(bad_model_checks, 4))


def fail_on(rank_to_fail):
    mesh = shardwise.init_mesh(2)
    if mesh.tp_rank == rank_to_fail:
        raise KeyError("boom on purpose")
    dist.barrier()  # the healthy rank waits here; the launcher must not wait for a timeout
    return os.getpid()


def die_on(rank_to_die):
    mesh = shardwise.init_mesh(2)
    if mesh.tp_rank == rank_to_die:
        os.kill(os.getpid(), 9)
    dist.barrier()


def report_pid(pid_file):
    Path(pid_file + str(os.environ["RANK"])).write_text(str(os.getpid()))
    return fail_on(1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_launch_reraises_first_failure_and_leaves_no_process(tmp_path):
    start = time.monotonic()
    with pytest.raises(KeyError, match="boom on purpose") as info:
        shardwise.launch(report_pid, 2, str(tmp_path / "pid"))
    assert time.monotonic() - start < 60
    assert any("rank 1" in note for note in info.value.__notes__)
    assert "fail_on" in str(info.value.__cause__)  # the rank's own traceback travels along
    for rank in (0, 1):
        assert not _alive(int((tmp_path / f"pid{rank}").read_text()))


def test_launch_reports_a_killed_rank():
    with pytest.raises(shardwise.RankFailure, match="rank 0 was killed by signal 9"):
        shardwise.launch(die_on, 2, 0, timeout_s=120)


def test_launch_rejects_bad_world_size():
    with pytest.raises(ValueError, match="positive integer"):
        shardwise.launch(fail_on, 0, 0)


def test_same_script_under_torchrun_and_launch():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/quickstart.py"]
    out = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    # the two ranks share stdout, so their lines may interleave: find the numbers, not the lines
    errors = [float(v) for v in re.findall(r"max \|tp - dense\| = ([0-9.e+-]+\d)", out.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-5, out.stdout
    from quickstart import main  # examples/ is on sys.path (conftest)

    assert max(shardwise.launch(main, 2)) < 1e-5


def stall_on(rank_to_stall):
    mesh = shardwise.init_mesh(2, timeout_s=3)  # collectives give up after 3 s
    if mesh.tp_rank == rank_to_stall:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))


def test_a_stalled_rank_times_out_the_others_and_is_named():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        shardwise.launch(stall_on, 2, 1)
    assert time.monotonic() - start < 30
    assert any("ranks [1] were still running" in note for note in info.value.__notes__)


def skip_init_on(rank_to_skip):
    if int(os.environ["RANK"]) == rank_to_skip:
        return "returned without init_mesh"
    assert os.environ["SHARDWISE_TIMEOUT_S"] == "3.0"  # launch's comm_timeout_s reaches init_mesh's default
    shardwise.init_mesh(2)


def test_a_rank_that_never_calls_init_mesh_is_named():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 never called init_mesh within 3 s \(joined: 0\)"):
        shardwise.launch(skip_init_on, 2, 1, comm_timeout_s=3)
    assert time.monotonic() - start < 30  # the 3 s rendezvous timeout, not torch's default 30 min or ours 300 s
    # rank 0 hosts the store: when it is the one missing, the others say so
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 could not reach .* rank 0, which hosts it, never called"):
        shardwise.launch(skip_init_on, 2, 0, comm_timeout_s=3)
    with pytest.raises(ValueError, match="comm_timeout_s must be a positive number"):
        shardwise.launch(skip_init_on, 2, 0, comm_timeout_s=0)


def _environment_seen(names):
    """In a rank: the variables `names` as the rank sees them, and torch.distributed's debug level."""
    return {n: os.environ.get(n) for n in names}, str(dist.get_debug_level())


def test_ranks_see_the_launchers_current_environment_under_both_start_methods(monkeypatch):
    """Ranks are forked from a fork server started at the first launch: a variable set, changed or removed in the
    launcher afterwards must reach the ranks as it is now (a server's stale environment would not), including
    TORCH_DISTRIBUTED_DEBUG, which torch.distributed reads at import; SHARDWISE_START_METHOD=spawn works too, and
    a bad value names the choices."""
    names = ["SHARDWISE_TEST_VAR", "TORCH_DISTRIBUTED_DEBUG"]
    monkeypatch.setenv("SHARDWISE_TEST_VAR", "first")
    assert shardwise.launch(_environment_seen, 1, names)[0][0]["SHARDWISE_TEST_VAR"] == "first"
    monkeypatch.setenv("SHARDWISE_TEST_VAR", "second")
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    seen, level = shardwise.launch(_environment_seen, 1, names)[0]
    assert seen == {"SHARDWISE_TEST_VAR": "second", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"} and level.endswith("DETAIL")
    monkeypatch.delenv("SHARDWISE_TEST_VAR")
    monkeypatch.delenv("TORCH_DISTRIBUTED_DEBUG")
    seen, level = shardwise.launch(_environment_seen, 1, names)[0]
    assert seen == {"SHARDWISE_TEST_VAR": None, "TORCH_DISTRIBUTED_DEBUG": None} and level.endswith("OFF")
    monkeypatch.setenv("SHARDWISE_START_METHOD", "spawn")
    monkeypatch.setenv("SHARDWISE_TEST_VAR", "spawned")
    assert shardwise.launch(_environment_seen, 1, names)[0][0]["SHARDWISE_TEST_VAR"] == "spawned"
    monkeypatch.setenv("SHARDWISE_START_METHOD", "fork")
    with pytest.raises(ValueError, match="'forkserver' or 'spawn'"):
        shardwise.launch(_environment_seen, 1, names)
