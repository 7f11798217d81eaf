"""The comm event API on real gloo ranks: async collectives are the blocking primitives with async_op=True
(same choke point, same events, right bytes), start notifications come only to observers that ask for them,
and the data-parallel gradient sync is seen by the profiler like every tensor-parallel collective."""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.testing import assert_close

import shardwise
from helpers import FP32
from shardwise import comm
from shardwise.data_parallel import average_gradients
from shardwise.layers import overlapped


def _check_async_primitives(mesh):
    tp = mesh.tp_size
    heard, plain = [], []
    comm.add_observer(heard.append, starts=True)
    comm.add_observer(plain.append)
    try:
        x = torch.arange(6.0).reshape(3, 2) + mesh.tp_rank
        pending = comm.all_reduce_(x.clone(), mesh, "probe", "fwd", async_op=True)
        assert isinstance(pending, comm.Pending)
        started = [e for e in heard if isinstance(e, comm.CollectiveStart)]
        assert [(e.op, e.nbytes, e.async_op, e.tag) for e in started] == [("all_reduce", 24, True, "probe")]
        assert not any(isinstance(e, comm.CollectiveEvent) for e in heard)  # reported when waited, not before
        want = sum(torch.arange(6.0).reshape(3, 2) + r for r in range(tp))
        assert_close(pending.wait(), want, **FP32)
        done = [e for e in heard if isinstance(e, comm.CollectiveEvent)]
        assert [(e.op, e.numel, e.nbytes, e.group_size, e.async_op) for e in done] == [("all_reduce", 6, 24, tp, True)]

        gathered = comm.all_gather(x, 0, mesh, "probe", "bwd", async_op=True).wait()
        assert_close(gathered, torch.cat([torch.arange(6.0).reshape(3, 2) + r for r in range(tp)]), **FP32)
        parts = torch.arange(8.0 * tp).reshape(4 * tp, 2)
        mine = comm.reduce_scatter(parts, mesh, "probe", "bwd", async_op=True).wait()
        assert_close(mine, parts.chunk(tp)[mesh.tp_rank] * tp, **FP32)
        finished = [(e.op, e.numel, e.nbytes, e.tag) for e in heard if isinstance(e, comm.CollectiveEvent)]
        # each all-gather / reduce-scatter is preceded by its shape agreement (one int64 row per rank), reported
        # as communication of the same layer, so the profiler does not count it as compute
        check = ("all_gather", 9 * tp, 72 * tp, "probe:shape_check")
        assert finished[1:] == [check, ("all_gather", 6 * tp, 24 * tp, "probe"), check,
                                ("reduce_scatter", 8 * tp, 32 * tp, "probe")]  # fmt: skip
        # an observer that did not ask for starts sees exactly the finished events
        assert plain == [e for e in heard if not isinstance(e, comm.CollectiveStart)]
        assert sum(isinstance(e, comm.CollectiveStart) for e in heard) == 3

        # the blocking primitive: start then finish, same fields, async_op False
        heard.clear()
        comm.all_reduce_(torch.ones(5, dtype=torch.float64), mesh, "probe", "fwd")
        assert [type(e).__name__ for e in heard] == ["CollectiveStart", "CollectiveEvent"]
        assert heard[1].nbytes == heard[0].nbytes == 40 and not heard[1].async_op
    finally:
        comm.remove_observer(heard.append)
        comm.remove_observer(plain.append)


def _check_overlap_uses_primitives(mesh):
    """The overlapped layers' async collectives are comm's primitives, not a copy of them: count the calls."""
    calls = []
    originals = comm.all_reduce_, comm.all_gather, comm.reduce_scatter

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls.append((fn.__name__, kwargs.get("async_op", False)))
            return fn(*args, **kwargs)

        return wrapper

    comm.all_reduce_, comm.all_gather, comm.reduce_scatter = (counting(f) for f in originals)
    events = []
    comm.add_observer(events.append)
    try:
        t = torch.ones(4, 3)
        with overlapped.Inflight(mesh, "probe", "fwd", t) as comms:
            comms.wait(comms.all_reduce(t))
            comms.wait(comms.all_gather(t))
            comms.wait(comms.reduce_scatter(torch.ones(2 * mesh.tp_size, 3), torch.empty(2, 3)))
    finally:
        comm.all_reduce_, comm.all_gather, comm.reduce_scatter = originals
        comm.remove_observer(events.append)
    assert calls == [("all_reduce_", True), ("all_gather", True), ("reduce_scatter", True)]
    coll = [(e.op, e.nbytes, e.async_op) for e in events if isinstance(e, comm.CollectiveEvent)]
    tp = mesh.tp_size
    assert coll == [("all_reduce", 48, True), ("all_gather", 48 * tp, True), ("reduce_scatter", 24 * tp, True)]


def _check_dp_sync_profiled():
    mesh = shardwise.init_mesh(1, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch.manual_seed(10 + mesh.dp_rank)  # each dp rank its own batch
    model(torch.randn(5, 3)).sum().backward()
    mine = [p.grad.clone() for p in model.parameters()]
    others = [torch.empty_like(g) for g in mine]
    for g, other in zip(mine, others, strict=True):  # the reference: a plain exchange, outside comm
        dist.all_reduce(other.copy_(g), group=mesh.dp_group)
    with shardwise.profile() as prof:
        average_gradients(model, mesh)
    for p, total in zip(model.parameters(), others, strict=True):
        assert_close(p.grad, total / 2, **FP32)
    (event,) = prof.collectives
    numel = sum(p.numel() for p in model.parameters())
    assert (event.op, event.tag, event.group_size, event.numel, event.nbytes) == (
        "all_reduce",
        "dp_grad_sync",
        2,
        numel,
        4 * numel,
    )
    return True


def event_checks():
    mesh = shardwise.init_mesh(2)
    _check_async_primitives(mesh)
    _check_overlap_uses_primitives(mesh)
    return mesh.tp_rank


def test_async_collectives_share_the_choke_point():
    assert shardwise.launch(event_checks, 2) == [0, 1]


def test_dp_grad_sync_seen_by_profiler():
    assert all(shardwise.launch(_check_dp_sync_profiled, 2))


def test_no_observer_no_events():
    assert not comm.observed()
    seen = []
    comm.add_observer(seen.append, starts=True)
    assert comm.observed()
    comm.remove_observer(seen.append)
    assert not comm.observed()
