"""Live resharding (shardwise.live_reshard) on 4 gloo ranks, ONE launch: a GPT trained with Adam is moved through a
chain of layouts (tp 2 <-> 4 with dp 2 / 1, placement tp-inner <-> dp-inner, SP off -> on -> off, tp1dp4 -> tp2dp2 with
ZeRO). At each switch: (1) the full weights and Adam moments right after equal those right before (exact, padding
dropped), and equal, padding included, what a checkpoint saved before the switch and loaded at the new layout gives;
(2) the next losses equal that checkpoint run's; (3) every loss of the chain equals an independent plain-torch RefGPT
trained on the same global batches. Switching back to a grid reuses its process groups; bad requests raise on every
rank before anything changes."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardwise
from nn.reference import RefGPT
from shardwise import rng
from shardwise.commands.train import TrainConfig, load_checkpoint, save_checkpoint
from shardwise.data_parallel import make_optimizer, optimizer_states, wrap_ddp
from shardwise.live_reshard import Layout, reshard_training
from shardwise.nn import GPT, GPTConfig
from shardwise.sharding import dense_layout, full_parameters, place, shard_spec

# 253: padded to 254 at tp=2 and 256 at tp=4, so padding rows differ between layouts; 6 heads with 2 kv heads:
# 3 + 3 q heads at tp=2 (kv heads apart), 2, 2, 1, 1 at tp=4 (kv heads held by two ranks: replicated).
CFG = GPTConfig(vocab_size=253, hidden=48, num_layers=1, num_heads=6, num_kv_heads=2)
BATCH, SEQ, LR, TOL = 4, 8, 1e-3, 1e-5
START = Layout(2, 2)
CHAIN = [  # (layout, steps after the switch, ZeRO)
    (Layout(4, 1), 20, False),  # tp 2 -> 4, dp 2 -> 1
    (Layout(2, 2, "dp-inner"), 2, False),  # tp 4 -> 2, dp-inner
    (Layout(2, 2, "tp-inner", True), 2, False),  # back to the first grid (cached groups), SP on
    (Layout(2, 2), 2, False),  # SP off: same grid, nothing crosses ranks
    (Layout(1, 4), 2, True),  # tp 2 -> 1, ZeRO over dp=4
    (Layout(2, 2), 2, True),  # tp1dp4 -> tp2dp2, ZeRO -> ZeRO, cached groups again
]


def _batch(step):
    """The global batch of `step`: counting from random starts (learnable in a few steps, so the loss falls)."""
    starts = torch.randint(0, CFG.vocab_size, (BATCH, 1), generator=torch.Generator().manual_seed(1000 + step))
    ids = (starts + torch.arange(SEQ + 1)) % CFG.vocab_size
    return ids[:, :-1], ids[:, 1:]


def _optimizer(zero):
    return lambda params, mesh: make_optimizer(params, mesh, torch.optim.Adam, zero=zero, lr=LR)


def _step(ddp, opt, mesh, step):
    """One training step on this rank's slice of the global batch; the global mean loss."""
    ids, targets = _batch(step)
    mine = slice(mesh.dp_rank * BATCH // mesh.dp_size, (mesh.dp_rank + 1) * BATCH // mesh.dp_size)
    loss = ddp(ids[mine], targets[mine])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.detach().clone()
    if mesh.dp_size > 1:
        dist.all_reduce(value, group=mesh.dp_group)
    return float(value) / mesh.dp_size


def _ref_step(ref, ref_opt, step):
    loss = ref(*_batch(step))
    loss.backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _full_state(model, opt, mesh):
    """name -> [weight, exp_avg, exp_avg_sq] full (padding kept), and name -> Adam step. With ZeRO only dp rank 0's
    moments are real (others: zeros). Collective; one object all-gather over tp (not reshard's per-tensor path)."""
    states = optimizer_states(opt)
    mine, steps = {}, {}
    for name, p in model.named_parameters():
        state = states.get(p, {})
        mine[name] = (
            shard_spec(p),
            [t.detach() for t in (p, state.get("exp_avg", p * 0), state.get("exp_avg_sq", p * 0))],
        )
        steps[name] = float(state["step"]) if state else None
    every = [mine]
    if mesh.tp_size > 1:
        every = [None] * mesh.tp_size
        dist.all_gather_object(every, mine, group=mesh.tp_group)
    full = {}
    for name, (spec, tensors) in mine.items():
        if spec is None:
            full[name] = [t.clone() for t in tensors]
            continue
        full[name] = []
        for i, t in enumerate(tensors):
            shape = list(t.shape)
            shape[spec.dim] = spec.full
            whole = t.new_zeros(shape)
            for theirs in every:
                place(whole, theirs[name][1][i], theirs[name][0])
            full[name].append(whole)
    return full, steps


def _dense(full, model):
    params = dict(model.named_parameters())
    return {name: [dense_layout(t, params[name]) for t in ts] for name, ts in full.items()}


def _assert_equal(a, b, what):
    for name in a:
        assert len(a[name]) == len(b[name]), what
        for kind, x, y in zip(("weight", "exp_avg", "exp_avg_sq"), a[name], b[name], strict=False):
            assert x.shape == y.shape and torch.equal(x, y), f"{what}: {name} {kind} differs"


def _bad_requests(model, opt):
    """Each bad request's message, per rank; nothing may change (mesh, groups)."""
    mesh, errors = model.mesh, []
    small = GPT(GPTConfig(vocab_size=64, hidden=16, num_layers=1, num_heads=2), mesh)
    mismatched = Layout(4, 1) if dist.get_rank() == 0 else Layout(2, 2)
    for m, layout in ((model, Layout(3, 1)), (model, mismatched), (small, Layout(4, 1))):
        with pytest.raises(ValueError) as info:
            reshard_training(m, opt, layout, make_optimizer=_optimizer(False))
        errors.append(str(info.value))
    wrong = "4:1" if dist.get_rank() == 0 else Layout(4, 1)  # one rank passes a string: every rank must refuse
    with pytest.raises(TypeError) as info:
        reshard_training(model, opt, wrong, make_optimizer=_optimizer(False))
    errors.append(str(info.value))
    model(*_batch(0)).backward()  # gradients left unapplied
    with pytest.raises(ValueError) as info:
        reshard_training(model, opt, Layout(4, 1), make_optimizer=_optimizer(False))
    errors.append(str(info.value))
    opt.zero_grad(set_to_none=True)
    assert shardwise.get_mesh() is mesh
    return errors


def _chain(out):
    new_groups = []
    real_new_group = dist.new_group

    def counting_new_group(*args, **kwargs):
        new_groups.append(args[0] if args else kwargs.get("ranks"))
        return real_new_group(*args, **kwargs)

    dist.new_group = counting_new_group
    mesh = shardwise.init_mesh(START.tp, START.dp)
    torch.manual_seed(0)
    model = GPT(CFG, mesh)
    ref = RefGPT(CFG.vocab_size, CFG.hidden, CFG.num_layers, CFG.num_heads, CFG.num_kv_heads)
    full = full_parameters(model, mesh)
    ref.load_state_dict({name: dense_layout(full[name], p) for name, p in model.named_parameters()})
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    ddp, opt = wrap_ddp(model, mesh), _optimizer(False)(model.parameters(), mesh)
    built = len(new_groups)
    errors = _bad_requests(model, opt)
    assert len(new_groups) == built, "a refused request built process groups"
    losses, ref_losses, report, grids = [], [], [], {(2, 2, "tp-inner"): mesh}
    step = 0
    for _ in range(3):
        losses.append(_step(ddp, opt, mesh, step))
        ref_losses.append(_ref_step(ref, ref_opt, step))
        step += 1
    zero = False
    for i, (layout, steps, new_zero) in enumerate(CHAIN):
        where = f"switch {i} to {layout.name} at step {step}"
        directory = Path(out) / f"switch-{i}"
        save_checkpoint(directory, model, opt, mesh, step, TrainConfig(), [], [])
        before, before_steps = _full_state(model, opt, mesh)
        before = _dense(before, model)
        cpu_rng = torch.get_rng_state()
        groups_before = len(new_groups)
        new = reshard_training(model, opt, layout, make_optimizer=_optimizer(new_zero))
        key = (layout.tp, layout.dp, layout.placement)
        if key in grids:  # a grid seen before: its own groups, no new ones
            assert len(new_groups) == groups_before, f"{where}: rebuilt process groups {new_groups[groups_before:]}"
            assert new.mesh.tp_group is grids[key].tp_group and new.mesh.dp_group is grids[key].dp_group, where
        grids.setdefault(key, new.mesh)
        assert shardwise.get_mesh() is new.mesh and Layout.of(new.model) == layout, where
        assert torch.equal(torch.get_rng_state(), cpu_rng), f"{where}: the CPU RNG moved"
        tp_stream = rng.tp_generator(new.mesh, torch.device("cpu")).get_state()
        with torch.random.fork_rng(devices=[]):
            rng.manual_seed(torch.initial_seed(), new.mesh)
            assert torch.equal(tp_stream, rng.tp_generator(new.mesh, torch.device("cpu")).get_state()), where
        if key == (mesh.tp_size, mesh.dp_size, mesh.placement):  # only SP toggled: every rank keeps its rows
            assert new.bytes_moved == 0, where
        elif mesh.tp_size > 1:
            assert new.bytes_moved > 0, where

        # (1) the same state, and the one a checkpoint load at the new layout gives, padding included
        after, after_steps = _full_state(new.model, new.optimizer, new.mesh)
        moments_real = not (zero or new_zero) or dist.get_rank() == 0  # ZeRO: only dp rank 0 sees them all
        dense_after = _dense(after, new.model)
        if not moments_real:
            before = {n: ts[:1] for n, ts in before.items()}
            dense_after = {n: ts[:1] for n, ts in dense_after.items()}
        _assert_equal(before, dense_after, f"{where}: before vs after")
        if moments_real:
            assert after_steps == before_steps, where
        ck_model = GPT(replace(CFG, sequence_parallel=layout.sequence_parallel), new.mesh)
        ck_ddp, ck_opt = wrap_ddp(ck_model, new.mesh), _optimizer(new_zero)(ck_model.parameters(), new.mesh)
        load_checkpoint(directory, ck_model, ck_opt, new.mesh)
        loaded, _ = _full_state(ck_model, ck_opt, new.mesh)
        if not moments_real:
            loaded, after = ({n: ts[:1] for n, ts in d.items()} for d in (loaded, after))
        _assert_equal(after, loaded, f"{where}: reshard vs checkpoint load")

        # (2) the next losses: the checkpoint run's; (3) the plain-torch reference's
        model, ddp, opt, mesh, zero = new.model, new.ddp, new.optimizer, new.mesh, new_zero
        for _ in range(steps):
            losses.append(_step(ddp, opt, mesh, step))
            ck_loss = _step(ck_ddp, ck_opt, mesh, step)
            assert abs(losses[-1] - ck_loss) <= TOL, f"{where}: step {step} loss {losses[-1]} vs checkpoint {ck_loss}"
            ref_losses.append(_ref_step(ref, ref_opt, step))
            step += 1
        del ck_model, ck_ddp, ck_opt
        report.append((layout.name, new.bytes_moved, new.seconds))
    dist.new_group = real_new_group
    return {"losses": losses, "ref_losses": ref_losses, "errors": errors, "report": report, "grids": len(grids)}


def test_live_reshard_chain_matches_checkpoint_and_reference(tmp_path):
    results = shardwise.launch(_chain, 4, str(tmp_path), timeout_s=120)
    first = results[0]
    assert all(r["losses"] == first["losses"] for r in results)  # every rank saw the same global losses
    assert len(first["losses"]) == 3 + sum(steps for _, steps, _ in CHAIN)
    for step, (loss, ref) in enumerate(zip(first["losses"], first["ref_losses"], strict=True)):
        assert abs(loss - ref) <= TOL, f"step {step}: loss {loss} vs plain-torch reference {ref}"
    assert first["losses"][-1] < first["losses"][0]  # it trained
    for rank, r in enumerate(results):  # every rank refused every bad request, with the fix in the message
        grid, mismatch, heads, wrong_type, pending = r["errors"]
        assert "needs tp * dp = 3 ranks but the world has 4" in grid, (rank, grid)
        assert "ranks asked to reshard to different layouts" in mismatch and "rank 0: tp4dp1" in mismatch, rank
        assert "num_heads=2 cannot be split over tp=4" in heads, (rank, heads)
        assert wrong_type.startswith("rank 0: layout must be a shardwise.live_reshard.Layout"), (rank, wrong_type)
        assert "unapplied gradients" in pending and "zero_grad" in pending, (rank, pending)


def test_layout_names_and_parsing():
    assert Layout(2, 1).name == "tp2dp1-tp-inner" and Layout(2, 2, "dp-inner", True).name == "tp2dp2-dp-inner+sp"
    cases = [("2:1", Layout(2, 1)), ("2:2:dp-inner:sp", Layout(2, 2, "dp-inner", True)),
             ("4:1:tp-inner:0", Layout(4, 1)), ("1:4:tp-inner:1", Layout(1, 4, "tp-inner", True))]  # fmt: skip
    for text, layout in cases:
        assert Layout.parse(text) == layout and Layout.parse(layout.name) == layout
        assert Layout(**layout.to_dict()) == layout
    for bad in ("2", "2:x", "2:2:tp-outer", "2:2:tp-inner:maybe", "tp2dp2-sideways", "0:4"):
        with pytest.raises(ValueError, match="layout"):
            Layout.parse(bad)
