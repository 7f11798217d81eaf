"""Styles as objects: sequence parallelism through parallelize on a Hugging Face LLaMA (logits, loss and every
gradient equal the dense model's at tp 2 and 4, and at tp 2 x dp 2 under DDP; the replicated norm grads, summed by
the one coalesced sp_grad_sync, within 1e-5, also accumulated over two backwards), a user-defined style, and
Norm.from_dense."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import shardwise
from shardwise.convert import GatherSequence, SequenceParallelNorm, parallelize, plans
from shardwise.data_parallel import wrap_ddp
from shardwise.layers.norm import Norm
from shardwise.mesh import use_grid
from shardwise.sharding import dense_layout, full_gradients

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'shardwise[hf]')")

TOL = dict(atol=1e-4, rtol=1e-4)
NORM_TOL = dict(atol=1e-5, rtol=1e-5)  # the replicated norm grads: the sp_grad_sync's sums, fp32


def _llama(heads: int, kv: int, tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=8 * heads, intermediate_size=90, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                                   tie_word_embeddings=tie)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _dense_llama(heads, kv, tie):
    torch.manual_seed(0)
    dense = _llama(heads, kv, tie).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm whose weight went missing would show
        for name, p in dense.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return dense


def _check_grads(model, dense, mesh, what):
    grads, params = full_gradients(model, mesh), dict(model.named_parameters())
    for name, p in dense.named_parameters():
        got = dense_layout(grads[name], params[name])
        tol = NORM_TOL if "norm" in name else TOL
        assert_close(got, p.grad, **tol, msg=lambda m, n=name: f"{what}: grad of {n}: {m}")


def _sp_parity(mesh, heads, kv, tie):
    dense = _dense_llama(heads, kv, tie)
    model = parallelize(copy.deepcopy(dense), plans.for_model(dense, sequence_parallel=True), mesh)
    assert isinstance(model.model.layers[1].input_layernorm, Norm) and model.model.norm.sequence_parallel
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    out, out_dense = model(ids, labels=ids), dense(ids, labels=ids)
    hook.remove()
    what = f"llama sp heads={heads} kv={kv} tie={tie} tp={mesh.tp_size}"
    assert seen == [torch.Size([2, 12 // mesh.tp_size, 8 * heads])], (what, seen)  # really this rank's tokens
    assert_close(out.logits, out_dense.logits, **TOL, msg=lambda m: f"{what}: logits: {m}")
    assert_close(out.loss, out_dense.loss, **TOL)
    out.loss.backward()
    out_dense.loss.backward()
    _check_grads(model, dense, mesh, what)  # final when backward() returned
    # accumulation: a second micro-batch without zero_grad adds its (summed) grads to the first's
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    dense(ids, labels=ids).loss.backward()
    _check_grads(model, dense, mesh, what + " accumulated")
    return True


def _sp_dp_parity(mesh):
    """tp 2 x dp 2 under DDP: each dp rank its own batch; the grads equal the dense model's mean over both."""
    dense = _dense_llama(4, 2, tie=False)
    model = wrap_ddp(parallelize(copy.deepcopy(dense), plans.for_model(dense, sequence_parallel=True), mesh), mesh)
    batches = [torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
    model(batches[mesh.dp_rank], labels=batches[mesh.dp_rank]).loss.backward()
    for ids in batches:
        (dense(ids, labels=ids).loss / 2).backward()
    _check_grads(model.module, dense, mesh, "llama sp tp=2 dp=2")
    return True


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


class ScaleBy:
    """A style of the user's own: nothing in shardwise knows it."""

    def __init__(self, factor: float):
        self.factor = factor

    def apply(self, module, name, mesh):
        return Scaled(module, self.factor)


def sp_checks(tp):
    mesh = shardwise.init_mesh(tp=tp)
    ok = [_sp_parity(mesh, 4, 2, tie=False), _sp_parity(mesh, 6, 2, tie=True)]  # 6 heads on tp 4: uneven, cut kv
    # A user-defined style object in a plan, composed after a built-in one.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    model = parallelize(copy.deepcopy(dense), {"0": ("colwise", ScaleBy(3.0)), "2": "rowwise"}, mesh)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    expected = dense[2](dense[1](dense[0](x) * 3.0))
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    if tp == 4:  # the same 4 ranks as tp 2 x dp 2
        ok.append(_sp_dp_parity(use_grid(2, 2)))
    return all(ok)


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_sequence_parallel_matches_dense(tp):
    assert all(shardwise.launch(sp_checks, tp, tp))


def test_norm_from_dense_matches_torch_and_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    mesh = shardwise.Mesh.single()
    layer_norm = nn.LayerNorm(16, eps=1e-6)
    rms = nn.RMSNorm(16, eps=1e-5)
    hf = LlamaRMSNorm(16, eps=1e-5)
    no_bias = nn.LayerNorm(16, bias=False)
    for dense in (layer_norm, rms, hf, no_bias):
        with torch.no_grad():
            dense.weight.add_(torch.randn(16) * 0.5)
            if getattr(dense, "bias", None) is not None:
                dense.bias.add_(torch.randn(16))
        norm = Norm.from_dense(dense, mesh)
        assert_close(norm(x), dense(x), atol=1e-5, rtol=1e-5, msg=lambda m, d=dense: f"{type(d).__name__}: {m}")
    assert isinstance(SequenceParallelNorm().apply(hf, "n", mesh), Norm)
    with pytest.raises(TypeError, match="expected nn.LayerNorm"):
        Norm.from_dense(nn.Linear(2, 2), mesh)
    with pytest.raises(ValueError, match="neither a style name"):
        parallelize(nn.Sequential(nn.Linear(2, 2)), {"0": object()}, mesh)
    assert GatherSequence().dim == 1
