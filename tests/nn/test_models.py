"""ParallelMLP, ParallelAttention (MHA, GQA split and replicated), block and GPT against the same classes
at tp=1 (the dense model), with and without sequence parallelism, on real gloo ranks."""

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import shardwise
from helpers import tokens
from shardwise import rng
from shardwise.generation import generate
from shardwise.nn import GPT, GPTConfig, ParallelAttention, ParallelMLP, ParallelTransformerBlock
from shardwise.nn.attention import KVCache
from shardwise.sharding import full_gradients

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32


def _compare_grads(model, dense, mesh, where):
    full = full_gradients(model, mesh)
    for name, p in dense.named_parameters():
        got = full[name][: p.shape[0]]  # vocabulary padding rows sit past the dense table
        assert_close(got, p.grad, **TOL, msg=lambda m, n=name: f"{where}: grad of {n}: {m}")
        assert torch.count_nonzero(full[name][p.shape[0] :]) == 0


def _check_module(mesh, make, sp, where, s=8, b=2, hidden=32):  # noqa: PLR0913
    torch.manual_seed(1)
    model = make(mesh, sp)
    torch.manual_seed(1)
    dense = make(shardwise.Mesh.single(), False)
    torch.manual_seed(2)
    x = torch.randn(s, b, hidden)
    g = torch.randn(s, b, hidden)
    xd = x.clone().requires_grad_()
    yd = dense(xd)
    yd.backward(g)
    xl = tokens(x, mesh, sp).clone().requires_grad_()
    y = model(xl)
    assert_close(y, tokens(yd, mesh, sp).detach(), **TOL, msg=lambda m: f"{where}: output: {m}")
    y.backward(tokens(g, mesh, sp))
    assert_close(xl.grad, tokens(xd.grad, mesh, sp), **TOL, msg=lambda m: f"{where}: input grad: {m}")
    _compare_grads(model, dense, mesh, where)


def _check_gpt(mesh, sp, cfg_kwargs):
    cfg = GPTConfig(vocab_size=61, hidden=32, num_layers=2, num_heads=4, sequence_parallel=sp, **cfg_kwargs)
    torch.manual_seed(3)
    model = GPT(cfg, mesh)
    torch.manual_seed(3)
    dense = GPT(GPTConfig(**{**cfg.to_dict(), "sequence_parallel": False}), shardwise.Mesh.single())
    torch.manual_seed(4)
    ids = torch.randint(0, 61, (2, 8))
    targets = torch.randint(0, 61, (2, 8))
    where = f"GPT sp={sp} {cfg_kwargs}"
    assert_close(model.full_logits(model(ids)), dense(ids), **TOL, msg=lambda m: f"{where}: logits: {m}")
    loss, loss_dense = model(ids, targets), dense(ids, targets)
    assert_close(loss, loss_dense, **TOL)
    loss.backward()
    loss_dense.backward()
    _compare_grads(model, dense, mesh, where)


def _check_dropout_streams(mesh):
    def masks(seed):
        rng.manual_seed(seed, mesh)
        x = torch.ones(4096)
        return (rng.dropout(x, 0.5, True, mesh, sharded=True),
                rng.dropout(x, 0.5, True, mesh, sharded=False))  # fmt: skip

    inside, outside = masks(11)
    again_inside, again_outside = masks(11)
    assert torch.equal(inside, again_inside) and torch.equal(outside, again_outside)  # reproducible
    every_inside = [torch.empty_like(inside) for _ in range(mesh.tp_size)]
    every_outside = [torch.empty_like(outside) for _ in range(mesh.tp_size)]
    dist.all_gather(every_inside, inside)
    dist.all_gather(every_outside, outside)
    assert all(torch.equal(every_outside[0], o) for o in every_outside)  # replicated: one mask
    assert all(not torch.equal(every_inside[0], o) for o in every_inside[1:])  # sharded: one per rank
    assert 0.4 < (inside == 0).float().mean() < 0.6


def _check_generation(mesh):
    cfg = GPTConfig(vocab_size=61, hidden=48, num_layers=2, num_heads=6, num_kv_heads=3)  # uneven at tp=4
    torch.manual_seed(5)
    model = GPT(cfg, mesh)
    torch.manual_seed(5)
    dense = GPT(cfg, shardwise.Mesh.single())
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(9))
    greedy = generate(model, prompt, 20)
    assert torch.equal(greedy, generate(dense, prompt, 20))
    assert torch.equal(greedy, generate(model, prompt, 20, use_cache=False))  # the cache changes nothing
    sampled = generate(model, prompt, 20, temperature=0.8, top_k=10, seed=3)
    assert torch.equal(sampled, generate(dense, prompt, 20, temperature=0.8, top_k=10, seed=3))
    every = [torch.empty_like(sampled) for _ in range(mesh.tp_size)]
    dist.all_gather(every, sampled)
    assert all(torch.equal(every[0], other) for other in every)  # all ranks decode the same tokens
    # each rank's cache holds only its own kv heads
    caches = [KVCache() for _ in model.blocks]
    model(prompt, caches=caches)
    assert caches[0].keys.shape == (2, model.blocks[0].attn.layout.kv_heads, 5, 8)


def model_checks(tp):
    mesh = shardwise.init_mesh(tp)
    _check_dropout_streams(mesh)
    _check_generation(mesh)
    kv_cases = [None, 2] + ([1] if tp > 1 else [])  # MHA; GQA (replicated kv at tp=4); MQA
    for sp in (False, True):
        _check_module(mesh, lambda m, sp: ParallelMLP(32, 64, "gelu", sequence_parallel=sp, mesh=m), sp, "MLP gelu")
        _check_module(mesh, lambda m, sp: ParallelMLP(32, 48, "swiglu", bias=False, sequence_parallel=sp, mesh=m),
                      sp, "MLP swiglu")  # fmt: skip
        for kv in kv_cases:
            for rope in (False, True):
                make = lambda m, sp, kv=kv, rope=rope: ParallelAttention(
                    32, 4, kv, rope=rope, sequence_parallel=sp, mesh=m
                )
                _check_module(mesh, make, sp, f"attention kv={kv} rope={rope}")
        # uneven: 9 heads / 3 kv heads (groups cut across ranks at tp=2 and 4), ffn 50
        for kv in (9, 3, 1):
            make = lambda m, sp, kv=kv: ParallelAttention(36, 9, kv, rope=True, sequence_parallel=sp, mesh=m)
            _check_module(mesh, make, sp, f"attention 9 heads kv={kv}", hidden=36)
        _check_module(mesh, lambda m, sp: ParallelMLP(32, 50, "swiglu", sequence_parallel=sp, mesh=m), sp, "MLP 50")
        _check_module(
            mesh,
            lambda m, sp: ParallelTransformerBlock(
                32, 4, 64, num_kv_heads=2, activation="swiglu", norm="rmsnorm", rope=True, sequence_parallel=sp, mesh=m
            ),  # fmt: skip
            sp,
            "block swiglu/rmsnorm/gqa",
        )
        _check_module(mesh, lambda m, sp: ParallelTransformerBlock(32, 4, sequence_parallel=sp, mesh=m), sp, "block")
        _check_gpt(mesh, sp, {})
        _check_gpt(mesh, sp, {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm", "bias": False})
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_models_match_dense(tp):
    assert all(shardwise.launch(model_checks, tp, tp))
