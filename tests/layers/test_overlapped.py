"""Overlapped (async, chunked) parallel linear layers against the same layers without overlap and against
dense nn.Linear, on real gloo ranks: outputs, the full input gradient element by element on every rank,
weight and bias grads; a Megatron MLP and a shared-input SwiGLU end to end; SHARDWISE_CHECK_ASYNC."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import shardwise
from helpers import shard, tokens
from shardwise import comm
from shardwise.layers import overlapped as overlap
from shardwise.layers.linear import column_linear
from shardwise.sharding import balanced_range, gather_full, shard_spec

SAME = dict(atol=1e-6, rtol=1e-6)  # overlap vs no overlap: the same math, sums maybe in another order
TOL = dict(atol=1e-5, rtol=1e-5)  # vs dense fp32
CHUNKS = (1, 2, 4, 3)  # 10 local tokens: 10 | 5+5 | 3+3+2+2 | 4+3+3


def _all_tokens(x, mesh, sp):
    """Every rank's tokens of x, concatenated: the whole tensor on every rank."""
    if not sp:
        return x
    parts = [torch.empty_like(x) for _ in range(mesh.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=mesh.tp_group)
    return torch.cat(parts)


def _run(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _compare(where, got, base, dense_y, dense_dx, dense, layer, mesh, sp):  # noqa: PLR0913
    y, dx, grads = got
    y0, dx0, grads0 = base
    assert_close(y, y0, **SAME, msg=lambda m: f"{where}: output vs no overlap: {m}")
    assert_close(dx, dx0, **SAME, msg=lambda m: f"{where}: input grad vs no overlap: {m}")
    for name in grads0:
        assert_close(grads[name], grads0[name], **SAME, msg=lambda m, n=name: f"{where}: {n}.grad vs no overlap: {m}")
    assert_close(y, dense_y, **TOL, msg=lambda m: f"{where}: output vs dense: {m}")
    # the whole input grad, every element, on every rank (nanotron once returned a quarter of it right)
    assert_close(_all_tokens(dx, mesh, sp), dense_dx, **TOL, msg=lambda m: f"{where}: input grad vs dense: {m}")
    assert_close(gather_full(grads["weight"], shard_spec(layer.weight), mesh), dense.weight.grad, **TOL)
    bias = grads["bias"]
    if shard_spec(layer.bias) is not None:
        bias = gather_full(bias, shard_spec(layer.bias), mesh)
    assert_close(bias, dense.bias.grad, **TOL, msg=lambda m: f"{where}: bias grad vs dense: {m}")


def _check_column(mesh, sp, chunks, fin=8, fout=13, gather_output=False):
    s = 10 * mesh.tp_size
    torch.manual_seed(s + fout + chunks)
    dense = nn.Linear(fin, fout)
    x, g = torch.randn(s, 3, fin), torch.randn(s, 3, fout)
    xd = x.clone().requires_grad_()
    yd = dense(xd)
    yd.backward(g)
    kw = dict(sequence_parallel=sp, gather_output=gather_output)
    base = shardwise.ColumnParallelLinear.from_dense(dense, mesh, **kw)
    over = shardwise.ColumnParallelLinear.from_dense(dense, mesh, overlap=True, chunks=chunks, **kw)
    g_local = g if gather_output else shard(g, -1, mesh)
    y_want = yd.detach() if gather_output else shard(yd.detach(), -1, mesh)
    xl = tokens(x, mesh, sp)
    where = f"column sp={sp} chunks={chunks} gather_output={gather_output}"
    _compare(where, _run(over, xl, g_local), _run(base, xl, g_local), y_want, xd.grad, dense, over, mesh, sp)


def _check_row(mesh, sp, chunks, fin=10, fout=8, input_is_parallel=True):
    s = 10 * mesh.tp_size
    torch.manual_seed(s + fin + chunks)
    dense = nn.Linear(fin, fout)
    x, g = torch.randn(s, 3, fin), torch.randn(s, 3, fout)
    xd = x.clone().requires_grad_()
    yd = dense(xd)
    yd.backward(g)
    kw = dict(sequence_parallel=sp, input_is_parallel=input_is_parallel)
    base = shardwise.RowParallelLinear.from_dense(dense, mesh, **kw)
    over = shardwise.RowParallelLinear.from_dense(dense, mesh, overlap=True, chunks=chunks, **kw)
    xl = shard(x, -1, mesh) if input_is_parallel else x
    got, ref = _run(over, xl, tokens(g, mesh, sp)), _run(base, xl, tokens(g, mesh, sp))
    y_want = tokens(yd.detach(), mesh, sp)
    # the input grad is feature-sharded: gather the features to check all of it on every rank
    if input_is_parallel:
        sizes = [b - a for a, b in (balanced_range(fin, mesh.tp_size, r) for r in range(mesh.tp_size))]
        with torch.no_grad():
            got = (got[0], comm.gather_from_tp(got[1], mesh, sizes=sizes), got[2])
            ref = (ref[0], comm.gather_from_tp(ref[1], mesh, sizes=sizes), ref[2])
    where = f"row sp={sp} chunks={chunks} input_is_parallel={input_is_parallel}"
    _compare(where, got, ref, y_want, xd.grad, dense, over, mesh, sp=False)


def _check_mlp(mesh, sp, chunks, swiglu, h=16, f=24):
    """column (overlap) -> gelu -> row (overlap), or SwiGLU with gate and up sharing one overlapped input."""
    s = 10 * mesh.tp_size
    torch.manual_seed(chunks + 100 * swiglu)
    up, gate, down = nn.Linear(h, f), nn.Linear(h, f), nn.Linear(f, h)
    x, g = torch.randn(s, 2, h), torch.randn(s, 2, h)
    xd = x.clone().requires_grad_()
    z = F.silu(gate(xd)) * up(xd) if swiglu else F.gelu(up(xd))
    yd = down(z)
    yd.backward(g)
    kw = dict(sequence_parallel=sp, overlap=True, chunks=chunks)
    up_p = shardwise.ColumnParallelLinear.from_dense(up, mesh, **kw)
    gate_p = shardwise.ColumnParallelLinear.from_dense(gate, mesh, **kw)
    down_p = shardwise.RowParallelLinear.from_dense(down, mesh, **kw)
    xl = tokens(x, mesh, sp).clone().requires_grad_()
    if swiglu:
        zg, zu = column_linear(xl, gate_p, up_p)
        y = down_p(F.silu(zg) * zu)
    else:
        y = down_p(F.gelu(up_p(xl)))
    y.backward(tokens(g, mesh, sp))
    where = f"mlp sp={sp} chunks={chunks} swiglu={swiglu}"
    assert_close(y, tokens(yd, mesh, sp).detach(), **TOL, msg=lambda m: f"{where}: output: {m}")
    assert_close(_all_tokens(xl.grad, mesh, sp), xd.grad, **TOL, msg=lambda m: f"{where}: input grad: {m}")
    for par, ref in [(up_p, up), (down_p, down)] + ([(gate_p, gate)] if swiglu else []):
        assert_close(gather_full(par.weight.grad, shard_spec(par.weight), mesh), ref.weight.grad, **TOL)
        bias = par.bias.grad if shard_spec(par.bias) is None else gather_full(par.bias.grad, shard_spec(par.bias), mesh)
        assert_close(bias, ref.bias.grad, **TOL, msg=lambda m: f"{where}: bias grad: {m}")


def _check_events(mesh):
    """The profiler sees every async collective (op, bytes, wait time) and each layer call's compute."""
    s, fin, fout = 10 * mesh.tp_size, 8, 4 * mesh.tp_size
    col = shardwise.ColumnParallelLinear(fin, fout, sequence_parallel=True, overlap=True, chunks=3, mesh=mesh)
    x = torch.randn(10, 2, fin, requires_grad=True)
    events = []
    comm.add_observer(events.append)
    try:
        col(x).sum().backward()
    finally:
        comm.remove_observer(events.append)
    every = [e for e in events if isinstance(e, comm.CollectiveEvent)]
    # the shape agreement before the chunks (Inflight.check_tokens) is reported too, as the layer's own blocking
    # all-gather of one int64 row per rank; the chunks are the async ones
    checks = [e for e in every if e.tag.endswith(":shape_check")]
    assert checks and all(e.op == "all_gather" and not e.async_op and e.numel == 9 * mesh.tp_size for e in checks)
    coll = [e for e in every if not e.tag.endswith(":shape_check")]
    assert [(e.phase, e.op) for e in coll] == [("fwd", "all_gather")] * 3 + [("bwd", "reduce_scatter")] * 3
    assert [e.numel for e in coll] == [n * mesh.tp_size * 2 * fin for n in (4, 3, 3)] * 2
    assert sum(e.nbytes for e in coll[:3]) == s * 2 * fin * 4  # the chunks add up to one full all-gather
    for e in coll:
        assert e.async_op and 0 <= e.wait_s <= e.seconds <= e.inflight_s, e
    assert {(e.tag, e.phase) for e in events if isinstance(e, comm.ComputeEvent)} == {
        (col.tag, "fwd"),
        (col.tag, "bwd"),
    }


def _check_async_checker(mesh):
    os.environ["SHARDWISE_CHECK_ASYNC"] = "1"
    t = torch.ones(4)
    with overlap.Inflight(mesh, "probe", "fwd", t) as comms:
        h = comms.all_reduce(t)
        with pytest.raises(AssertionError, match="all_reduce issued by probe: its result was read before wait"):
            h.tensor.sum()  # a deliberately premature use
        assert torch.equal(h.wait(), torch.full((4,), float(mesh.tp_size)))
        assert torch.equal(h.tensor, torch.full((4,), float(mesh.tp_size)))
        with pytest.raises(AssertionError, match="all_reduce issued by probe: waited twice"):
            h.wait()
    leaked = []
    with pytest.raises(AssertionError, match=r"all_gather issued by probe \(bwd\) was never waited on"):
        with overlap.Inflight(mesh, "probe", "bwd", t) as comms:
            leaked.append(comms.all_gather(t))
    leaked[0].wait()  # keep the ranks' collectives in step
    # unset: no wrapper at all, the plain Pending
    del os.environ["SHARDWISE_CHECK_ASYNC"]
    with overlap.Inflight(mesh, "probe", "fwd", t) as comms:
        h = comms.all_reduce(t)
        assert type(h) is comm.Pending
        h.wait()


def _check_async_slices(mesh):
    """Check mode covers reduce-scatters that write straight into a slice (dx, y): the slice holds NaN until
    wait(), so code that reads it early computes NaN, not a result that is right whenever the op was quick."""
    os.environ["SHARDWISE_CHECK_ASYNC"] = "1"
    tp = mesh.tp_size
    dx = torch.zeros(3, 2)
    parts = torch.arange(4.0 * tp).reshape(2 * tp, 2)  # the same partial sums on every rank
    with overlap.Inflight(mesh, "probe", "bwd", dx) as comms:
        h = comms.reduce_scatter(parts, dx[1:3])
        assert dx[1:3].isnan().all(), dx  # what an early read sees
        assert comms.wait(h).data_ptr() == dx[1:3].data_ptr()
    assert torch.equal(dx[1:3], parts.view(tp, 2, 2)[mesh.tp_rank] * tp) and torch.equal(dx[0], torch.zeros(2))
    assert torch.equal(h.tensor, dx[1:3])
    # a backward that reads dx before its last reduce-scatter is waited on (a mutant of _land) now fails visibly
    land = overlap._land

    def early(comms, handle, offset, dx, sp):
        snapshot = None if dx is None else dx.clone()  # read before the wait
        result = land(comms, handle, offset, dx, sp)
        return snapshot if sp else result

    overlap._land = early
    try:
        layer = shardwise.ColumnParallelLinear(4, 2 * tp, sequence_parallel=True, overlap=True, chunks=2, mesh=mesh)
        x = torch.randn(4, 4, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad.isnan().any(), x.grad
    finally:
        overlap._land = land
        del os.environ["SHARDWISE_CHECK_ASYNC"]


def overlap_checks(tp, check_async):
    mesh = shardwise.init_mesh(tp)
    _check_async_checker(mesh)
    _check_async_slices(mesh)
    if check_async:  # run every layer below with checked handles
        os.environ["SHARDWISE_CHECK_ASYNC"] = "1"
    for sp in (False, True):
        for chunks in CHUNKS:
            _check_column(mesh, sp, chunks)
            _check_row(mesh, sp, chunks)
        _check_mlp(mesh, sp, 3, swiglu=False)
        _check_mlp(mesh, sp, 2, swiglu=True)
    _check_column(mesh, True, 2, gather_output=True)
    _check_row(mesh, False, 2, input_is_parallel=False)
    _check_events(mesh)
    return mesh.tp_rank


@pytest.mark.parametrize("tp", [2, 4])
def test_overlap_matches_plain_and_dense(tp):
    assert shardwise.launch(overlap_checks, tp, tp, tp == 4) == list(range(tp))


def test_chunk_bounds():
    assert overlap.chunk_bounds(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert overlap.chunk_bounds(10, 4) == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert overlap.chunk_bounds(2, 4) == [(0, 1), (1, 1)]
    assert overlap.chunk_bounds(5, 1) == [(0, 5)]


def test_tp1_and_bad_options():
    torch.manual_seed(0)
    dense = nn.Linear(6, 5)
    x = torch.randn(7, 6)
    for sp in (False, True):
        layer = shardwise.ColumnParallelLinear.from_dense(dense, shardwise.Mesh.single(), sequence_parallel=sp,
                                                          overlap=True, chunks=3)  # fmt: skip
        assert_close(layer(x), dense(x), **TOL)
        row = shardwise.RowParallelLinear.from_dense(dense, shardwise.Mesh.single(), sequence_parallel=sp,
                                                     overlap=True, chunks=3)  # fmt: skip
        assert_close(row(x), dense(x), **TOL)
    with pytest.raises(ValueError, match="pass overlap=True"):
        shardwise.ColumnParallelLinear(6, 5, chunks=2, mesh=shardwise.Mesh.single())
    with pytest.raises(ValueError, match="chunks must be a positive integer"):
        shardwise.RowParallelLinear(6, 5, overlap=True, chunks=0, mesh=shardwise.Mesh.single())


# ---- overlap is real: the compute runs while the collective is in flight ------------------------------------


class _Timeline(TorchDispatchMode):
    """Records, in order, every collective's issue and the end of its wait (comm's observer: CollectiveStart at
    issue, CollectiveEvent when wait() returns), and every matmul with its output shape."""

    def __init__(self):
        super().__init__()
        self.log = []

    def observe(self, event):
        kind = "issue" if isinstance(event, comm.CollectiveStart) else "waited"
        if isinstance(event, (comm.CollectiveStart, comm.CollectiveEvent)):
            self.log.append((kind, event.op, event.start))  # start identifies the collective in both

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.log.append(("mm", (out.numel() // out.shape[-1], out.shape[-1])))
        return out

    def __enter__(self):
        comm.add_observer(self.observe, starts=True)
        return super().__enter__()

    def __exit__(self, *exc):
        comm.remove_observer(self.observe)
        return super().__exit__(*exc)

    def index(self, entry) -> int:
        return self.log.index(entry)

    def collectives(self, op):
        """(issue index, waited index) of each `op`, in issue order."""
        starts = [e[2] for e in self.log if e[:2] == ("issue", op)]
        return [(self.index(("issue", op, t)), self.index(("waited", op, t))) for t in starts]

    def matmuls(self, shape):
        """Indices of the matmuls whose output is `shape` (leading dims flattened)."""
        rows = math.prod(shape[:-1])
        return [i for i, e in enumerate(self.log) if e == ("mm", (rows, shape[-1]))]


def _in_flight_during(tl, op, k, shape, where):
    """The k-th `op` collective was issued before a matmul with output `shape` and waited on after it."""
    issue, waited = tl.collectives(op)[k]
    assert any(issue < i < waited for i in tl.matmuls(shape)), (
        f"{where}: no {list(shape)} matmul ran while {op} #{k} was in flight (issued at {issue}, waited at "
        f"{waited}); timeline: {tl.log}"
    )


def _check_overlap_order(tp):
    """column backward: dW runs between the dx collective's issue and its wait (with SP too); with chunks, chunk
    c+1's dx between chunk c's issue and wait. row forward: chunk c+1's partial sums while chunk c is reduced;
    row SP backward: chunk c's dx while chunk c+1's grad is gathered; column SP forward: chunk c multiplied while
    chunk c+1 is gathered."""
    mesh = shardwise.init_mesh(tp)
    s, b, fin, fout = 4 * tp, 2, 8, 4 * tp
    out_local = fout // tp
    for sp, op in ((False, "all_reduce"), (True, "reduce_scatter")):
        col = shardwise.ColumnParallelLinear(fin, fout, sequence_parallel=sp, overlap=True, mesh=mesh)
        x = torch.randn(s // tp if sp else s, b, fin, requires_grad=True)
        y = col(x)
        with _Timeline() as tl:
            y.backward(torch.randn_like(y))
        _in_flight_during(tl, op, 0, (out_local, fin), f"column sp={sp} backward: dW")
    col = shardwise.ColumnParallelLinear(fin, fout, overlap=True, chunks=2, mesh=mesh)
    y = col(torch.randn(s, b, fin, requires_grad=True))
    with _Timeline() as tl:
        y.backward(torch.randn_like(y))
    _in_flight_during(tl, "all_reduce", 0, (s // 2, b, fin), "column chunks=2 backward: chunk 1's dx")
    _in_flight_during(tl, "all_reduce", 1, (out_local, fin), "column chunks=2 backward: dW")
    x = torch.randn(s, b, fin, requires_grad=True)  # this rank's tokens: 4 per chunk
    with _Timeline() as tl:
        col_sp = shardwise.ColumnParallelLinear(fin, fout, sequence_parallel=True, overlap=True, chunks=2, mesh=mesh)
        col_sp(x)
    _in_flight_during(tl, "all_gather", 1, (tp * s // 2, b, out_local), "column SP forward: chunk 0's matmul")
    for sp, op in ((False, "all_reduce"), (True, "reduce_scatter")):
        row = shardwise.RowParallelLinear(fout, fin, sequence_parallel=sp, overlap=True, chunks=2, mesh=mesh)
        x = torch.randn(s, b, out_local, requires_grad=True)
        n = s // tp if sp else s
        with _Timeline() as tl:
            y = row(x)
        _in_flight_during(tl, op, 0, (tp * n // 2 if sp else n // 2, b, fin), f"row sp={sp} forward: chunk 1")
        if sp:
            with _Timeline() as tl:
                y.backward(torch.randn_like(y))
            _in_flight_during(tl, "all_gather", 1, (tp * n // 2, b, out_local), "row SP backward: chunk 0's dx")
    return True


def test_overlap_runs_compute_while_collectives_fly():
    assert all(shardwise.launch(_check_overlap_order, 2, 2))
