"""Each parallel layer against its dense torch counterpart, on real gloo ranks, tp in {1, 2, 4}."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import shardwise
from helpers import full_grad, shard
from shardwise.layers.embedding import padded_vocab
from shardwise.sharding import gather_full, shard_spec

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32; collectives only reorder sums


def _check_linear(mesh, tokens, fin, fout, sp):
    torch.manual_seed(tokens * 1000 + fin + fout)
    dense = nn.Linear(fin, fout)
    x = torch.randn(tokens, 3, fin)
    g = torch.randn(tokens, 3, fout)
    xd = x.clone().requires_grad_()
    dense(xd).backward(g)

    # column-parallel, output left sharded
    col = shardwise.ColumnParallelLinear.from_dense(dense, mesh, sequence_parallel=sp)
    xc = (shard(x, 0, mesh) if sp else x).clone().requires_grad_()
    y = col(xc)
    assert_close(y, shard(dense(x), -1, mesh).detach(), **TOL)
    y.backward(shard(g, -1, mesh))
    assert_close(xc.grad, shard(xd.grad, 0, mesh) if sp else xd.grad, **TOL)
    assert_close(full_grad(col.weight, mesh), dense.weight.grad, **TOL)
    assert_close(full_grad(col.bias, mesh), dense.bias.grad, **TOL)

    # column-parallel, output gathered
    colg = shardwise.ColumnParallelLinear.from_dense(dense, mesh, gather_output=True, sequence_parallel=sp)
    xc = (shard(x, 0, mesh) if sp else x).clone().requires_grad_()
    y = colg(xc)
    assert_close(y, dense(x).detach(), **TOL)
    y.backward(g)
    assert_close(xc.grad, shard(xd.grad, 0, mesh) if sp else xd.grad, **TOL)
    assert_close(full_grad(colg.weight, mesh), dense.weight.grad, **TOL)
    assert_close(full_grad(colg.bias, mesh), dense.bias.grad, **TOL)

    # row-parallel, input already sharded
    row = shardwise.RowParallelLinear.from_dense(dense, mesh, sequence_parallel=sp)
    xr = shard(x, -1, mesh).clone().requires_grad_()
    y = row(xr)
    assert_close(y, (shard(dense(x), 0, mesh) if sp else dense(x)).detach(), **TOL)
    y.backward(shard(g, 0, mesh) if sp else g)
    assert_close(xr.grad, shard(xd.grad, -1, mesh), **TOL)
    assert_close(full_grad(row.weight, mesh), dense.weight.grad, **TOL)
    assert_close(row.bias.grad, dense.bias.grad, **TOL)

    if not sp:  # row-parallel splitting a full input itself
        rowf = shardwise.RowParallelLinear.from_dense(dense, mesh, input_is_parallel=False)
        xf = x.clone().requires_grad_()
        y = rowf(xf)
        assert_close(y, dense(x).detach(), **TOL)
        y.backward(g)
        assert_close(xf.grad, xd.grad, **TOL)
        assert_close(full_grad(rowf.weight, mesh), dense.weight.grad, **TOL)
        assert_close(rowf.bias.grad, dense.bias.grad, **TOL)


def _check_embedding(mesh, vocab, dim, sp):
    torch.manual_seed(vocab)
    dense = nn.Embedding(vocab, dim)
    ids = torch.randint(0, vocab, (8, 3))
    ids[0, 0], ids[1, 1] = 0, vocab - 1  # both ends of the table
    g = torch.randn(8, 3, dim)
    dense(ids).backward(g)
    emb = shardwise.VocabParallelEmbedding.from_dense(dense, mesh, sequence_parallel=sp)
    assert emb.weight.shape[0] * mesh.tp_size == padded_vocab(vocab, mesh.tp_size)
    y = emb(ids)
    assert_close(y, (shard(dense(ids), 0, mesh) if sp else dense(ids)).detach(), **TOL)
    y.backward(shard(g, 0, mesh) if sp else g)
    full = full_grad(emb.weight, mesh)
    assert_close(full[:vocab], dense.weight.grad, **TOL)
    assert torch.count_nonzero(full[vocab:]) == 0  # padding rows never receive gradient


def _check_cross_entropy(mesh, vocab):
    torch.manual_seed(vocab + 7)
    logits = torch.randn(10, vocab) * 3
    target = torch.randint(0, vocab, (10,))
    target[3] = -100
    target[4] = vocab - 1
    ld = logits.clone().requires_grad_()
    F.cross_entropy(ld, target, reduction="none").sum().backward()
    ref = F.cross_entropy(logits, target, reduction="none")

    padded = padded_vocab(vocab, mesh.tp_size)
    # padding columns hold huge values: masking must stop them from winning
    full = torch.cat([logits, torch.full((10, padded - vocab), 50.0)], dim=-1)
    local = shard(full, -1, mesh).clone().requires_grad_()
    loss = shardwise.vocab_parallel_cross_entropy(local, target, mesh, vocab_size=vocab)
    assert_close(loss, ref, **TOL)
    loss.sum().backward()
    grad_full = torch.cat([ld.grad, torch.zeros(10, padded - vocab)], dim=-1)
    assert_close(local.grad, shard(grad_full, -1, mesh), **TOL)


def _check_tp_independent_init(mesh):
    for cls, args in (
        (shardwise.ColumnParallelLinear, (12, 8)),
        (shardwise.RowParallelLinear, (8, 12)),
        (shardwise.VocabParallelEmbedding, (13, 6)),
    ):
        torch.manual_seed(5)
        layer = cls(*args, mesh=mesh)
        torch.manual_seed(5)
        dense = cls(*args, mesh=shardwise.Mesh.single())
        for (name, p), (_, q) in zip(layer.named_parameters(), dense.named_parameters(), strict=True):
            full = gather_full(p, shard_spec(p), mesh)
            rows = q.shape[0]
            assert torch.equal(full[:rows], q.detach()), (cls.__name__, name)


def _check_bad_inputs(mesh):
    if mesh.tp_size > 1:
        with pytest.raises(ValueError, match=f"out_features=1 cannot be split over tp={mesh.tp_size}"):
            shardwise.ColumnParallelLinear(8, 1, mesh=mesh)
        with pytest.raises(ValueError, match="gather_output needs the default split"):
            shardwise.ColumnParallelLinear(8, 8, gather_output=True, out_ranges=[(0, 4)], mesh=mesh)
        row = shardwise.RowParallelLinear(8, 4, mesh=mesh)
        with pytest.raises(ValueError, match="input_is_parallel=False"):
            row(torch.randn(2, 8))  # a full input fed to a layer expecting its shard
    col = shardwise.ColumnParallelLinear(8, 4 * mesh.tp_size, mesh=mesh)
    with pytest.raises(ValueError, match=r"expected input \[..., 8\]"):
        col(torch.randn(2, 9))
    emb = shardwise.VocabParallelEmbedding(10, 4, mesh=mesh)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(TypeError, match="int64"):
        emb(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="vocab_size"):
        shardwise.vocab_parallel_cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), mesh, vocab_size=0)


def layer_checks(tp):
    mesh = shardwise.init_mesh(tp)
    for sp in (False, True):
        # sizes that are and are not multiples of tp (uneven: shares differ by one)
        _check_linear(mesh, tokens=4, fin=8, fout=12, sp=sp)
        _check_linear(mesh, tokens=8, fin=4 * tp, fout=20, sp=sp)
        _check_linear(mesh, tokens=4, fin=10, fout=13, sp=sp)
        for vocab in (37, 40, 3):
            if vocab >= tp:
                _check_embedding(mesh, vocab, 6, sp)
    for vocab in (37, 40, 5):
        _check_cross_entropy(mesh, vocab)
    _check_tp_independent_init(mesh)
    _check_bad_inputs(mesh)
    return mesh.tp_rank


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layers_match_dense(tp):
    assert shardwise.launch(layer_checks, tp, tp) == list(range(tp))


@pytest.mark.parametrize("cls", [shardwise.ColumnParallelLinear, shardwise.RowParallelLinear])
def test_from_dense_leaves_the_rng_alone_and_names_its_options(cls):
    torch.manual_seed(3)
    dense = nn.Linear(6, 4)
    state = torch.get_rng_state()
    layer = cls.from_dense(dense, shardwise.Mesh.single(), sequence_parallel=True)
    assert torch.equal(torch.get_rng_state(), state), "from_dense drew from the user's random stream"
    x = torch.randn(5, 6)
    assert_close(layer(x), dense(x), **TOL)
    with pytest.raises(ValueError, match=r"takes the bias from the dense layer \(it has one\); drop bias="):
        cls.from_dense(dense, shardwise.Mesh.single(), bias=False)
    with pytest.raises(TypeError, match=r"unexpected options \['dtype'\]; it accepts \[.*'sequence_parallel'"):
        cls.from_dense(dense, shardwise.Mesh.single(), dtype=torch.float64)
    held = "rows ((0, 4),)" if cls is shardwise.ColumnParallelLinear else "cols ((0, 6),)"
    assert f"in=6, out=4 ({held}), tp=1, bias=True" in repr(layer) and "sequence_parallel=True" in repr(layer)


def test_embedding_from_dense_leaves_the_rng_alone():
    dense = nn.Embedding(11, 4)
    state = torch.get_rng_state()
    emb = shardwise.VocabParallelEmbedding.from_dense(dense, shardwise.Mesh.single())
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(emb.weight[:11], dense.weight)
