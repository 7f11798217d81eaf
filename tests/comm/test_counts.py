"""One forward+backward of a transformer block issues exactly Megatron's minimum of collectives."""

import torch

import shardwise
from shardwise import comm
from shardwise.nn import ParallelTransformerBlock


def _record(mesh, sp, s=8, b=2, h=32, forward_only=False):
    events = []
    torch.manual_seed(0)
    block = ParallelTransformerBlock(h, 4, sequence_parallel=sp, mesh=mesh)
    x = torch.randn(s // mesh.tp_size if sp else s, b, h, requires_grad=True)
    comm.add_observer(events.append)
    try:
        y = block(x)
        forward = list(events)
        y.sum().backward()
    finally:
        comm.remove_observer(events.append)
    if forward_only:
        return None, None, forward
    backward = events[len(forward) :]
    summary = lambda evs: sorted((e.op, e.numel, e.nbytes) for e in evs if isinstance(e, comm.CollectiveEvent))
    return summary(forward), summary(backward), backward


def count_checks():
    mesh = shardwise.init_mesh(2)
    s, b, h = 8, 2, 32
    act = s * b * h
    fwd, bwd, _ = _record(mesh, sp=False)
    assert fwd == [("all_reduce", act, act * 4)] * 2, fwd
    assert bwd == [("all_reduce", act, act * 4)] * 2, bwd
    fwd, bwd, raw = _record(mesh, sp=True)
    # each forward all-gather / reduce-scatter is preceded by the ranks' shape agreement: an all-gather of one
    # [1 + 8] int64 row per rank, reported as that layer's communication (tag "<layer>:shape_check")
    # only the entries are checked (attention's and the MLP's all-gather): each exit's reduce-scatter input follows
    # from its entry's checked shape (comm.checks.shapes_agreed)
    check = ("all_gather", 9 * 2, 9 * 2 * 8)
    assert fwd == sorted([("all_gather", act, act * 4)] * 2 + [("reduce_scatter", act, act * 4)] * 2 + [check] * 2), fwd
    assert bwd.count(check) == 0, bwd  # backward's collectives were checked in forward
    big = [e for e in bwd if e[1] == act]
    small = [e for e in bwd if e[1] != act]
    assert big == sorted([("all_gather", act, act * 4)] * 2 + [("reduce_scatter", act, act * 4)] * 2), bwd
    # replicated params seeing different tokens (two norms' weight+bias, two row-parallel biases): their grads
    # summed by ONE coalesced all-reduce, async, tagged sp_grad_sync
    assert small == [("all_reduce", 6 * h, 24 * h)], small
    (sync,) = [e for e in raw if isinstance(e, comm.CollectiveEvent) and e.numel != act]
    _, _, fwd_raw = _record(mesh, sp=True, forward_only=True)
    checks = [e for e in fwd_raw if isinstance(e, comm.CollectiveEvent) and e.numel == 18]
    assert len(checks) == 2 and all(e.tag.endswith(":shape_check") and e.seconds > 0 for e in checks), checks
    coll = [e for e in fwd_raw if isinstance(e, comm.CollectiveEvent)]
    after = [coll[i + 1].op for i, e in enumerate(coll) if e.tag.endswith(":shape_check")]
    assert after == ["all_gather", "all_gather"], coll  # each check right before an entry's gather
    assert (sync.tag, sync.phase, sync.async_op) == ("sp_grad_sync", "bwd", True), sync
    # two blocks, one step: still one sync for both (not one per block or per parameter)
    events = []
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(ParallelTransformerBlock(h, 4, sequence_parallel=True, mesh=mesh) for _ in range(2)))
    comm.add_observer(events.append)
    try:
        blocks(torch.randn(s // 2, b, h, requires_grad=True)).sum().backward()
    finally:
        comm.remove_observer(events.append)
    syncs = [e for e in events if isinstance(e, comm.CollectiveEvent) and e.tag == "sp_grad_sync"]
    assert [e.numel for e in syncs] == [12 * h], syncs
    # a whole SP GPT forward: ONE shape check, the embedding's (the ids' shape); every later collective's input
    # follows from it (2 blocks: 8 gathers/reduce-scatters + the head's gather, none checked)
    from shardwise.nn import GPT, GPTConfig

    gpt = GPT(GPTConfig(vocab_size=64, hidden=h, num_layers=2, num_heads=4, sequence_parallel=True),
              mesh=mesh)  # fmt: skip
    events = []
    comm.add_observer(events.append)
    try:
        gpt(torch.zeros(b, s, dtype=torch.long))
    finally:
        comm.remove_observer(events.append)
    coll = [e for e in events if isinstance(e, comm.CollectiveEvent)]
    checks = [e.tag for e in coll if e.tag.endswith(":shape_check")]
    assert checks == [gpt.embed.tag + ":shape_check"], checks
    # the check (an all-gather), the embedding's reduce-scatter, 2 blocks x (2 gathers + 2 reduce-scatters), the head's
    # gather: only the first is a check
    assert sum(e.op in ("all_gather", "reduce_scatter") for e in coll) == 1 + 1 + 2 * 4 + 1, coll
    return True


def test_block_collective_counts_tp2():
    assert all(shardwise.launch(count_checks, 2))
