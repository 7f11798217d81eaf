"""The dp axis through torch's DDP and ZeroRedundancyOptimizer, at tp=2 x dp=2 (4 gloo ranks, one launch):
a GPT trained with wrap_ddp + Adam (and ZeRO, and the dp-inner placement) follows the independent plain-torch
RefGPT trained on the whole global batch: the step-0 gradients, every step's loss and the final weights; the
mesh's groups hold the ranks the placement says; the profiler sees the bucket all-reduce as "dp_grad_sync"."""

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import shardwise
from helpers import FP32
from nn.reference import RefGPT
from shardwise.data_parallel import DP_TAG, average_gradients, is_zero, make_optimizer, wrap_ddp
from shardwise.mesh import destroy_mesh
from shardwise.nn import GPT, GPTConfig
from shardwise.sharding import dense_layout, full_gradients, full_parameters

VOCAB, BATCH, SEQ, STEPS = 64, 4, 8, 3
LR = 1e-3  # Adam turns a 1e-7 grad difference on a near-zero grad into a full step: a larger lr shows it at 1e-5
GROUPS = {  # (tp groups, dp groups) of a 2 x 2 world under each placement
    "tp-inner": ([[0, 1], [2, 3]], [[0, 2], [1, 3]]),
    "dp-inner": ([[0, 2], [1, 3]], [[0, 1], [2, 3]]),
}


def _check_groups(mesh, placement):
    tp_groups, dp_groups = GROUPS[placement]
    rank = dist.get_rank()
    assert mesh.placement == placement and mesh.rank == rank
    assert dist.get_process_group_ranks(mesh.tp_group) == next(g for g in tp_groups if rank in g), placement
    assert dist.get_process_group_ranks(mesh.dp_group) == next(g for g in dp_groups if rank in g), placement


def _dense(model, mesh, tensors):
    params = dict(model.named_parameters())
    return {name: dense_layout(t, params[name]) for name, t in tensors.items()}


def _train_and_compare(placement, zero):
    mesh = shardwise.init_mesh(2, 2, placement=placement)
    _check_groups(mesh, placement)
    where = f"{placement} zero={zero}"
    cfg = GPTConfig(vocab_size=VOCAB, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = GPT(cfg, mesh)
    ref = RefGPT(VOCAB, 32, 2, 4, 2)
    ref.load_state_dict(_dense(model, mesh, full_parameters(model, mesh)), strict=True)
    ddp = wrap_ddp(model, mesh)
    opt = make_optimizer(ddp.parameters(), mesh, torch.optim.Adam, zero=zero, lr=LR)
    assert is_zero(opt) == zero and type(opt).__name__ == ("ZeroRedundancyOptimizer" if zero else "Adam")
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(1)
    mine = slice(mesh.dp_rank * BATCH // 2, (mesh.dp_rank + 1) * BATCH // 2)
    losses = []
    with shardwise.profile(model) as prof:
        for step in range(STEPS):
            # counting from random starts: learnable in a few steps, so the loss must fall
            ids = (torch.randint(0, VOCAB, (BATCH, 1), generator=gen) + torch.arange(SEQ + 1)) % VOCAB
            ids, targets = ids[:, :-1], ids[:, 1:]
            prof.begin()
            loss = ddp(ids[mine], targets[mine])
            loss.backward()
            record = prof.step()
            with prof.paused():
                ref_loss = ref(ids, targets)
                ref_loss.backward()
                mean = loss.detach().clone()
                dist.all_reduce(mean, group=mesh.dp_group)
                assert_close(mean / 2, ref_loss.detach(), **FP32, msg=lambda m, s=step: f"{where} step {s}: {m}")
                if step == 0:  # DDP's averaged grads = the dense grads of the global batch
                    grads = _dense(model, mesh, full_gradients(model, mesh))
                    for name, p in ref.named_parameters():
                        assert_close(grads[name], p.grad, **FP32, msg=lambda m, n=name: f"{where}: d{n}: {m}")
                opt.step()
                opt.zero_grad(set_to_none=True)
                ref_opt.step()
                ref_opt.zero_grad(set_to_none=True)
            syncs = [e for e in prof.collectives[-record["collectives"] :] if e.tag == DP_TAG]
            assert syncs and {(e.op, e.group_size, e.phase, e.async_op) for e in syncs} == {("all_reduce", 2, "bwd", 1)}
            assert sum(e.numel for e in syncs) == sum(p.numel() for p in model.parameters()), where  # every grad
            assert all(e.inflight_s >= e.seconds - 1e-3 for e in syncs)
            losses.append(float(mean / 2))
    final = _dense(model, mesh, full_parameters(model, mesh))
    for name, p in ref.named_parameters():
        assert_close(final[name], p.detach(), **FP32, msg=lambda m, n=name: f"{where}: final {n}: {m}")
    assert losses[-1] < losses[0], where  # it trained
    destroy_mesh()
    return losses


def dp_checks():
    return {(p, z): _train_and_compare(p, z) for p, z in [("tp-inner", False), ("tp-inner", True), ("dp-inner", False)]}


def test_ddp_and_zero_match_dense_reference_under_both_placements():
    results = shardwise.launch(dp_checks, 4, timeout_s=150)
    assert all(r == results[0] for r in results)  # every rank saw the same global losses


def test_single_rank_passthrough_and_bad_placement():
    mesh = shardwise.Mesh.single()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, mesh) is model
    assert type(make_optimizer(model.parameters(), mesh, torch.optim.SGD, zero=True, lr=0.1)) is torch.optim.SGD
    average_gradients(model, mesh)  # the fallback stays importable; a no-op at dp == 1
    with pytest.raises(ValueError, match="tp-inner.*dp-inner"):
        shardwise.init_mesh(1, 1, placement="tp-outer")


def _train_resume(out):
    """`shardwise train`'s train_rank at tp=2 x dp=2 with --zero: 6 steps straight; 3 steps then resumed to 6 with
    --zero and, from a copy of the same checkpoint, without it (the checkpoint holds the consolidated Adam state)."""
    from dataclasses import replace

    from shardwise.commands.train import TrainConfig, train_rank

    data = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(tp=2, dp=2, zero=True, steps=6, hidden=32, layers=1, heads=4, seq=16, batch=4, eval_every=0,
                      checkpoint_every=3, progress=False)  # fmt: skip
    whole = train_rank(replace(cfg, out=f"{out}/whole"), data)
    for name in ("zero", "plain"):
        train_rank(replace(cfg, steps=3, out=f"{out}/{name}"), data)
    resumed = {name: train_rank(replace(cfg, out=f"{out}/{name}", resume=True, zero=name == "zero"), data)
               for name in ("zero", "plain")}  # fmt: skip
    return whole, resumed


def test_zero_checkpoint_resumes_exactly(tmp_path):
    whole, resumed = shardwise.launch(_train_resume, 4, str(tmp_path), timeout_s=150)[0]
    for name, run in resumed.items():
        assert run["start_step"] == 3 and len(run["losses"]) == 6, name
    assert_close(torch.tensor(resumed["zero"]["losses"]), torch.tensor(whole["losses"]), atol=1e-6, rtol=0)
    assert_close(torch.tensor(resumed["plain"]["losses"]), torch.tensor(whole["losses"]), **FP32)
