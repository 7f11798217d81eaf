"""ParallelMLP, ParallelAttention, ParallelTransformerBlock and GPT against the independent plain-torch models of
reference.py (not against themselves at tp=1): the sharded model's parameters are gathered to their dense shape
(sharding.full_parameters), loaded into the reference, and the output, the input grad and every parameter grad
are compared, at tp 1, 2 and 4, with and without sequence parallelism, GQA / MQA and uneven head splits."""

import pytest
import torch
from reference import RefAttention, RefBlock, RefGPT, RefMLP
from torch.testing import assert_close

import shardwise
from helpers import FP32, tokens
from shardwise.nn import GPT, GPTConfig, ParallelAttention, ParallelMLP, ParallelTransformerBlock
from shardwise.sharding import dense_layout, full_gradients, full_parameters, shard_spec


def _perturb_replicated(model, seed):
    """Norm weights start at ones and biases at zeros: give the whole-on-every-rank parameters random values
    (the same on every rank) so a misused norm weight or bias shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if shard_spec(p) is None:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _load_reference(model, ref, mesh):
    """The sharded model's gathered weights, in the dense layout (vocabulary padding dropped), into `ref`."""
    params = dict(model.named_parameters())
    full = {name: dense_layout(t, params[name]) for name, t in full_parameters(model, mesh).items()}
    ref.load_state_dict(full, strict=True)


def _compare_grads(model, ref, mesh, where):
    params = dict(model.named_parameters())
    grads = full_gradients(model, mesh)
    for name, p in ref.named_parameters():
        got = grads[name]
        assert_close(dense_layout(got, params[name]), p.grad, **FP32, msg=lambda m, n=name: f"{where}: d{n}: {m}")
        assert torch.count_nonzero(got[p.shape[0] :]) == 0, f"{where}: d{name} on vocabulary padding rows"


def _check_module(mesh, model, ref, sp, where, hidden, s=8, b=2):  # noqa: PLR0913
    _perturb_replicated(model, 7)
    _load_reference(model, ref, mesh)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(s, b, hidden, generator=gen), torch.randn(s, b, hidden, generator=gen)
    xr = x.transpose(0, 1).clone().requires_grad_()  # the reference is batch-first
    yr = ref(xr)
    yr.backward(g.transpose(0, 1))
    y_want, dx_want = yr.detach().transpose(0, 1), xr.grad.transpose(0, 1)
    xl = tokens(x, mesh, sp).clone().requires_grad_()
    y = model(xl)
    assert_close(y, tokens(y_want, mesh, sp), **FP32, msg=lambda m: f"{where}: output: {m}")
    y.backward(tokens(g, mesh, sp))
    assert_close(xl.grad, tokens(dx_want, mesh, sp), **FP32, msg=lambda m: f"{where}: input grad: {m}")
    _compare_grads(model, ref, mesh, where)


def _check_gpt(mesh, sp, kw):
    cfg = GPTConfig(vocab_size=61, hidden=32, num_layers=2, num_heads=4, sequence_parallel=sp, **kw)
    torch.manual_seed(3)
    model = GPT(cfg, mesh)
    ref = RefGPT(61, 32, 2, 4, kw.get("num_kv_heads"), None, kw.get("activation", "gelu"),
                 kw.get("norm", "layernorm"), kw.get("bias", True))  # fmt: skip
    _perturb_replicated(model, 8)
    _load_reference(model, ref, mesh)
    gen = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(0, 61, (2, 8), generator=gen), torch.randint(0, 61, (2, 8), generator=gen)
    where = f"GPT sp={sp} {kw}"
    assert_close(model.full_logits(model(ids)), ref(ids), **FP32, msg=lambda m: f"{where}: logits: {m}")
    loss, loss_ref = model(ids, targets), ref(ids, targets)
    assert_close(loss, loss_ref, **FP32, msg=lambda m: f"{where}: loss: {m}")
    loss.backward()
    loss_ref.backward()
    _compare_grads(model, ref, mesh, where)


def reference_checks(tp):
    mesh = shardwise.init_mesh(tp)
    kv_cases = [None, 2] + ([1] if tp > 1 else [])  # MHA; GQA (kv replicated at tp=4); MQA
    for sp in (False, True):
        torch.manual_seed(1)
        for act, ffn, bias in (("gelu", 64, True), ("swiglu", 48, False), ("swiglu", 50, True)):  # 50: uneven
            model = ParallelMLP(32, ffn, act, bias=bias, sequence_parallel=sp, mesh=mesh)
            _check_module(mesh, model, RefMLP(32, ffn, act, bias), sp, f"MLP {act} ffn={ffn}", 32)
        for kv in kv_cases:
            for rope in (False, True):
                model = ParallelAttention(32, 4, kv, rope=rope, sequence_parallel=sp, mesh=mesh)
                ref = RefAttention(32, 4, kv, use_rope=rope)
                _check_module(mesh, model, ref, sp, f"attention kv={kv} rope={rope}", 32)
        for kv in (9, 3, 1):  # 9 heads: uneven over tp 2 and 4, kv groups cut across ranks
            model = ParallelAttention(36, 9, kv, rope=True, sequence_parallel=sp, mesh=mesh)
            _check_module(mesh, model, RefAttention(36, 9, kv, use_rope=True), sp, f"attention 9/{kv}", 36)
        model = ParallelTransformerBlock(32, 4, 64, num_kv_heads=2, activation="swiglu", norm="rmsnorm", rope=True,
                                         sequence_parallel=sp, mesh=mesh)  # fmt: skip
        ref = RefBlock(32, 4, 64, 2, "swiglu", "rmsnorm", use_rope=True)
        _check_module(mesh, model, ref, sp, "block swiglu/rmsnorm/gqa", 32)
        model = ParallelTransformerBlock(32, 4, sequence_parallel=sp, mesh=mesh)
        _check_module(mesh, model, RefBlock(32, 4), sp, "block", 32)
        _check_gpt(mesh, sp, {})
        _check_gpt(mesh, sp, {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm", "bias": False})
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_models_match_plain_torch_reference(tp):
    assert all(shardwise.launch(reference_checks, tp, tp))
