"""Collective mismatches are clear errors on every rank: ranks holding different token counts under sequence
parallelism (gloo would abort the process, "killed by signal 6"), and, in the debug mode, collectives issued in a
different order (same-shaped all-reduces of two layers silently add the wrong tensors without it)."""

import inspect
import os

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.comm import checks
from shardwise.layers.overlapped import Inflight


def _uneven_tokens():
    """7 tokens on rank 0, 6 on rank 1: every path that gathers or reduce-scatters the token dim."""
    mesh = shardwise.init_mesh(2)
    n = 7 - mesh.tp_rank
    sizes = r"rank 0: \[7, 4\], rank 1: \[6, 4\]"
    with pytest.raises(ValueError, match=rf"all_gather 'gather_from_sp' \(fwd\).*{sizes}.*same sequence length"):
        comm.gather_from_sp(torch.ones(n, 4), mesh)
    # reduce-scatter: rank 0's 7 does not divide by tp and rank 1's 6 does; both still fail, with both shapes
    with pytest.raises(ValueError, match=sizes):
        comm.reduce_scatter_to_sp(torch.ones(n, 4), mesh)
    # the async path: the overlapped column layer checks its input once, before any chunk is issued
    layer = shardwise.ColumnParallelLinear(4, 8, sequence_parallel=True, overlap=True, chunks=3, mesh=mesh)
    with pytest.raises(ValueError, match=rf"all_gather '{layer.tag}' \(fwd\).*rank 0: \[7\], rank 1: \[6\]"):
        layer(torch.ones(n, 4))
    row = shardwise.RowParallelLinear(8, 4, sequence_parallel=True, overlap=True, chunks=2, mesh=mesh)
    with pytest.raises(ValueError, match=r"rank 0: \[8\], rank 1: \[6\]"):  # token dims only (features: shards)
        row(torch.ones(8 - 2 * mesh.tp_rank, 4))
    # the modules check their entry and skip the checks whose shapes follow from it (checks.shapes_agreed): a
    # token-count mismatch still raises at the entry, on every rank, for the MLP, a block and GPT (ids of 6 vs 4)
    from shardwise.nn import GPT, GPTConfig, ParallelMLP, ParallelTransformerBlock

    mlp = ParallelMLP(4, 8, sequence_parallel=True, mesh=mesh)
    with pytest.raises(ValueError, match=rf"all_gather '{mlp.up.tag}' \(fwd\).*{sizes}"):
        mlp(torch.ones(n, 4))
    block = ParallelTransformerBlock(4, 2, sequence_parallel=True, mesh=mesh)
    with pytest.raises(ValueError, match=r"rank 0: \[7, 1, 4\], rank 1: \[6, 1, 4\]"):
        block(torch.ones(n, 1, 4))
    gpt = GPT(GPTConfig(vocab_size=16, hidden=8, num_layers=1, num_heads=2, sequence_parallel=True),
              mesh=mesh)  # fmt: skip
    for lengths in ((6, 4), (6, 5)):  # 5: tp does not divide it on rank 1 alone, which must not leave rank 0 waiting
        with pytest.raises(ValueError, match=rf"rank 0: \[1, {lengths[0]}\], rank 1: \[1, {lengths[1]}\]"):
            gpt(torch.zeros(1, lengths[mesh.tp_rank], dtype=torch.long))
    with pytest.raises(ValueError, match=r"splits the sequence \(5 tokens\) over tp=2"):  # the same 5 everywhere
        gpt(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="inside"):  # a raise inside the region leaves it: checks are back
        with checks.shapes_agreed():
            raise RuntimeError("inside")
    with pytest.raises(ValueError, match=sizes):
        comm.gather_from_sp(torch.ones(n, 4), mesh)
    # the same count everywhere, but not a multiple of tp: every rank raises the same error
    with pytest.raises(ValueError, match=r"splits dim 0 \(7 tokens\) across tp=2"):
        comm.reduce_scatter_to_sp(torch.ones(7, 4), mesh)
    with pytest.raises(ValueError, match=r"splits dim 0 \(7 tokens\) across tp=2"):
        row(torch.ones(7, 4))
    # SHARDWISE_CHECK_SHAPES=0 skips the agreement (its cost) where a run is known good
    calls, original = [], checks.check_same_shape
    checks.check_same_shape = lambda *args: calls.append(args) or original(*args)
    try:
        comm.gather_from_sp(torch.ones(2, 2), mesh)
        os.environ["SHARDWISE_CHECK_SHAPES"] = "0"
        comm.gather_from_sp(torch.ones(2, 2), mesh)
    finally:
        checks.check_same_shape = original
        del os.environ["SHARDWISE_CHECK_SHAPES"]
    assert len(calls) == 1
    # and the ranks are still in step afterwards
    return comm.gather_from_sp(torch.full((3, 2), float(mesh.tp_rank)), mesh).sum(1).tolist()


def test_uneven_token_counts_raise_on_every_rank():
    assert shardwise.launch(_uneven_tokens, 2) == [[0.0] * 3 + [2.0] * 3] * 2


def _swapped(debug):
    """Two same-shaped all-reduces, tags A and B, issued A then B on rank 0 and B then A on rank 1."""
    mesh = shardwise.init_mesh(2, debug=debug)
    a, b = torch.full((4,), 1.0 + mesh.tp_rank), torch.full((4,), 10.0 * (1 + mesh.tp_rank))
    if mesh.tp_rank == 0:
        comm.all_reduce_(a, mesh, "A", "fwd")  # rank 0 first
        comm.all_reduce_(b, mesh, "B", "fwd")
    else:
        comm.all_reduce_(b, mesh, "B", "fwd")  # rank 1 first
        comm.all_reduce_(a, mesh, "A", "fwd")
    return a.tolist(), b.tolist()


def _line(marker):
    lines, first = inspect.getsourcelines(_swapped)
    return first + next(i for i, text in enumerate(lines) if marker in text)


def _swapped_checked():
    # Documented limitation without the debug mode: the sums are of the wrong tensors and nobody notices.
    a, b = _swapped(debug=False)
    assert (a if shardwise.get_mesh().tp_rank == 0 else b) == [21.0] * 4  # rank 0's a added to rank 1's b
    with pytest.raises(RuntimeError, match="collective mismatch") as info:
        _swapped(debug=True)
    text = str(info.value)
    assert "tag='A'" in text and "tag='B'" in text, text
    # both ranks' first collective, each with its own call site
    assert (
        f"rank 0 issues collective #0, all_reduce [4] float32 tag='A' (fwd), at {__file__}:{_line('rank 0 first')}"
        in text
    )
    assert (
        f"rank 1 issues collective #0, all_reduce [4] float32 tag='B' (fwd), at {__file__}:{_line('rank 1 first')}"
        in text
    )
    # the environment variable turns it on too, for the overlapped (async) path as well
    os.environ["SHARDWISE_DEBUG_COLLECTIVES"] = "1"
    try:
        mesh = shardwise.get_mesh()
        t = torch.ones(2)
        tag = "P" if mesh.tp_rank == 0 else "Q"
        with pytest.raises(RuntimeError, match=r"tag='P'.*tag='Q'"):
            with Inflight(mesh, tag, "bwd", t) as comms:
                comms.wait(comms.all_reduce(t))
        assert comm.all_reduce_(torch.ones(2), mesh, "same", "fwd").tolist() == [2.0, 2.0]  # agreeing ranks run
    finally:
        del os.environ["SHARDWISE_DEBUG_COLLECTIVES"]
    return True


def test_swapped_collectives_silent_by_default_raise_in_debug_mode():
    assert shardwise.launch(_swapped_checked, 2) == [True, True]


def test_an_agreed_region_skips_checks_in_its_own_thread_only(monkeypatch):
    """checks.shapes_agreed is per thread: a serving thread inside a module's region must not switch off the shape
    agreement of another thread's forward (no process group needed: check_same_shape is recorded, not run)."""
    import threading

    calls = []
    monkeypatch.setattr(checks, "check_same_shape", lambda shape, *rest: calls.append(shape))
    x, group = torch.ones(3, 4), object()
    inside, go_on = threading.Event(), threading.Event()

    def holder():
        with checks.shapes_agreed():
            checks.before("all_gather", x, group, 2, "held", "fwd", check_shape=True, debug=False)
            inside.set()
            go_on.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(10)
    try:
        assert checks.before("all_gather", x, group, 2, "other", "fwd", check_shape=True, debug=False) == "shape_check"
    finally:
        go_on.set()
        thread.join()
    assert calls == [(3, 4)]  # the other thread's check ran; the holder's, inside its region, did not
    with checks.shapes_agreed(), checks.shapes_agreed():  # nested, then left: checks are back
        assert checks.before("all_gather", x, group, 2, "t", "fwd", check_shape=True, debug=False) is None
    assert checks.before("all_gather", x, group, 2, "t", "fwd", check_shape=True, debug=False) == "shape_check"
