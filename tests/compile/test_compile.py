"""torch.compile(fullgraph=True) of the tensor-parallel GPT (parallel layers, attention, vocab-parallel loss), forward
and backward, at tp=2 with sequence parallelism off and on, and at tp=1: loss, every gradient and the parameters
after one SGD step equal the eager run's and an independent plain-torch RefGPT's (tests/nn/reference.py) within
fp32 1e-5. fullgraph=True makes any collective that is not a traceable functional op (a dist.* call, the observers'
timing, a shape check) a hard error. CI compiles with backend="aot_eager" (dynamo + AOTAutograd: graph breaks and
the autograd duals' traced backward are checked, without inductor's minutes of C++ compiles);
SHARDWISE_TEST_INDUCTOR=1 compiles with inductor as well."""

import os
import sys
from pathlib import Path

import torch
from torch.testing import assert_close

import shardwise
from helpers import FP32
from shardwise.nn import GPT, GPTConfig
from shardwise.sharding import dense_layout, full_gradients, full_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from reference import RefGPT  # noqa: E402

BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("SHARDWISE_TEST_INDUCTOR") == "1" else [])
LR = 0.1


def _dense_state(model, mesh) -> dict:
    params = dict(model.named_parameters())
    return {name: dense_layout(t, params[name]) for name, t in full_parameters(model, mesh).items()}


def _perturb(model, seed):
    """Norm weights start at ones and biases at zeros: random values make a wrong replicated grad show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _run(model, mesh, ids, targets, forward):
    """(loss, dense grads, dense params after one SGD step, loss after it) with `forward` (eager or compiled)."""
    model.zero_grad(set_to_none=True)
    loss = forward(ids, targets)
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: dense_layout(g, params[n]) for n, g in full_gradients(model, mesh).items()}
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    after = _dense_state(model, mesh)
    return loss.detach(), grads, after, forward(ids, targets).detach()


def _check(mesh, sp, backend):
    cfg = GPTConfig(vocab_size=61, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, sequence_parallel=sp)
    torch.manual_seed(3)
    model = GPT(cfg, mesh)
    _perturb(model, 5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = RefGPT(61, 32, 2, 4, 2)
    ref.load_state_dict(_dense_state(model, mesh), strict=True)
    gen = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(0, 61, (2, 8), generator=gen), torch.randint(0, 61, (2, 8), generator=gen)
    loss_ref = ref(ids, targets)
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    after_ref, loss2_ref = dict(ref.state_dict()), ref(ids, targets).detach()

    eager = _run(model, mesh, ids, targets, model)
    with torch.no_grad():  # back to the same start for the compiled run
        for n, p in model.named_parameters():
            p.copy_(start[n])
    torch._dynamo.reset()
    seen = []  # an observer (the profiler's hook) attached: the compiled graph must not run its Python timing
    shardwise.comm.add_observer(seen.append, starts=True)
    fn = torch.compile(model, fullgraph=True, backend=backend)
    try:
        compiled = _run(model, mesh, ids, targets, fn)
    finally:
        shardwise.comm.remove_observer(seen.append)
    # the profiler over one compiled step sees nothing (no host clock inside the graph): R is None, never a
    # silent 0 ("no communication"); over the eager step R is a number, > 0 at tp 2
    for forward, observable in ((fn, False), (model, True)):
        with shardwise.profile(model) as prof:
            prof.begin()
            forward(ids, targets).backward()
            record = prof.step()
        assert (record["R"] is not None) == observable, (forward, record)
        assert observable or record["collectives"] == record["computes"] == 0, record
        assert not observable or mesh.tp_size == 1 or record["R"] > 0, record
    for what, run in (("eager", eager), (f"compiled {backend}", compiled)):
        where = f"tp={mesh.tp_size} sp={sp} {what}"
        loss, grads, after, loss2 = run
        assert_close(loss, loss_ref.detach(), **FP32, msg=lambda m, w=where: f"{w}: loss: {m}")
        for name, g in grads_ref.items():
            assert_close(grads[name], g, **FP32, msg=lambda m, n=name, w=where: f"{w}: d{n}: {m}")
            assert_close(
                after[name], after_ref[name], **FP32, msg=lambda m, n=name, w=where: f"{w}: {n} after step: {m}"
            )
        assert_close(loss2, loss2_ref, **FP32, msg=lambda m, w=where: f"{w}: loss after the step: {m}")
    assert_close(compiled[0], eager[0], **FP32)


def compile_checks():
    mesh = shardwise.init_mesh(2)
    for backend in BACKENDS:
        for sp in (False, True):
            _check(mesh, sp, backend)
        if mesh.tp_rank == 0:  # tp=1: the dense model, no collectives, in this process alone
            _check(shardwise.Mesh.single(), False, backend)
    return True


def test_compiled_gpt_matches_eager_and_reference():
    assert all(shardwise.launch(compile_checks, 2))


def compile_ddp_checks():
    """train --compile at dp > 1: the GPT compiled in place (nn.Module.compile, as commands/train.py does), DDP
    outside it over dp=2; each rank's half batch; DDP's averaged grads == RefGPT's on the whole batch."""
    from shardwise.data_parallel import wrap_ddp

    mesh = shardwise.init_mesh(1, 2)
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=61, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2), mesh)
    _perturb(model, 5)
    ref = RefGPT(61, 32, 2, 4, 2)
    ref.load_state_dict(_dense_state(model, mesh), strict=True)
    gen = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(0, 61, (2, 8), generator=gen), torch.randint(0, 61, (2, 8), generator=gen)
    ref(ids, targets).backward()  # every row has 8 counted targets: the whole-batch mean = the mean of the halves'
    torch._dynamo.reset()
    model.compile(fullgraph=True, backend="aot_eager")
    ddp = wrap_ddp(model, mesh)
    mine = slice(mesh.dp_rank, mesh.dp_rank + 1)
    loss = ddp(ids[mine], targets[mine])
    loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(grads[name].grad, p.grad, **FP32, msg=lambda m, n=name: f"compiled + DDP dp=2: d{n}: {m}")
    return True


def test_compiled_gpt_under_ddp_matches_reference():
    assert all(shardwise.launch(compile_ddp_checks, 2))
