"""Adam training of the GPT at tp=2 and tp=2 x dp=2 (dp through torch DDP: wrap_ddp) follows the dense run step
by step."""

import torch
from torch.testing import assert_close

import shardwise
from shardwise.data_parallel import wrap_ddp
from shardwise.nn import GPT, GPTConfig

STEPS = 20


def _batches(vocab, batch, seq):
    gen = torch.Generator().manual_seed(123)
    for _ in range(STEPS):  # counting sequences from random starts: learnable, so the loss must fall
        starts = torch.randint(0, vocab, (batch, 1), generator=gen)
        ids = (starts + torch.arange(seq + 1)) % vocab
        yield ids[:, :-1], ids[:, 1:]


def train_and_compare(tp, dp, sp):
    mesh = shardwise.init_mesh(tp, dp)
    cfg = GPTConfig(vocab_size=50, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, sequence_parallel=sp)
    torch.manual_seed(0)
    model = GPT(cfg, mesh)
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**{**cfg.to_dict(), "sequence_parallel": False}), shardwise.Mesh.single())
    ddp = wrap_ddp(model, mesh)  # the model itself at dp=1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=3e-3)
    losses = []
    for ids, targets in _batches(cfg.vocab_size, batch=4, seq=8):
        # each dp rank trains on its quarter/half of the batch; the dense model sees all of it
        mine = slice(mesh.dp_rank * 4 // dp, (mesh.dp_rank + 1) * 4 // dp)
        loss = ddp(ids[mine], targets[mine])
        loss.backward()  # DDP averages the grads over dp
        opt.step()
        opt.zero_grad()
        loss_dense = dense(ids, targets)
        loss_dense.backward()
        opt_dense.step()
        opt_dense.zero_grad()
        if dp > 1:
            torch.distributed.all_reduce(loss := loss.detach().clone(), group=mesh.dp_group)
            loss /= dp
        assert_close(loss, loss_dense, atol=1e-4, rtol=1e-4)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # it did train
    return losses


def test_training_tp2_matches_dense():
    results = shardwise.launch(train_and_compare, 2, 2, 1, False)
    assert results[0] == results[1]


def test_training_tp2_dp2_sequence_parallel_matches_dense():
    results = shardwise.launch(train_and_compare, 4, 2, 2, True)
    assert results[0] == results[1]  # tp peers agree exactly
