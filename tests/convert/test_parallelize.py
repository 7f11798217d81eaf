"""parallelize() on small randomly initialised transformers models of each built-in family: logits, every
gradient and greedy generation equal the dense model's, at tp 2 and 4, with uneven head/ffn splits."""

import copy

import pytest
import torch
from shardwise.plans import for_model
from torch.testing import assert_close

import shardwise
from shardwise.convert import parallelize
from shardwise.sharding import dense_layout, full_gradients

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'shardwise[hf]')")

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32, the bar for whole models
VOCAB = 101  # divisible by neither 2 nor 4: the vocabulary is padded


def _llama(heads, kv, tie, family="llama"):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=90, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
              tie_word_embeddings=tie)  # fmt: skip
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    return model_cls(cfg)


def _gpt2(heads):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8 * heads, n_layer=2, n_head=heads, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert(heads):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8 * heads, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=90, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


def _compare(mesh, make, what, generate=True):
    torch.manual_seed(0)
    dense = make().eval()
    model = parallelize(copy.deepcopy(dense), for_model(dense), mesh)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    out_dense = dense(ids, labels=ids)
    out = model(ids, labels=ids)
    assert_close(out.logits, out_dense.logits, **TOL, msg=lambda m: f"{what} tp={mesh.tp_size}: logits: {m}")
    assert_close(out.loss, out_dense.loss, **TOL)
    out_dense.loss.backward()
    out.loss.backward()
    grads = full_gradients(model, mesh)
    params = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        got = dense_layout(grads[name], params[name])  # GPT-2's Conv1D is [in, out]; vocab padding dropped
        assert_close(got, p.grad, **TOL, msg=lambda m, n=name: f"{what} tp={mesh.tp_size}: grad of {n}: {m}")
    if generate:
        prompt = ids[:1, :5]
        greedy = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            want = dense.generate(prompt, **greedy)
            got = model.generate(prompt, **greedy)
        assert torch.equal(got, want), f"{what} tp={mesh.tp_size}: generation {got.tolist()} != {want.tolist()}"


def hf_checks(tp):
    mesh = shardwise.init_mesh(tp)
    _compare(mesh, lambda: _llama(4, 2, tie=False), "llama GQA 4/2")
    _compare(mesh, lambda: _llama(9, 3, tie=True), "llama 9/3 heads, tied (uneven, cut kv groups)")
    _compare(mesh, lambda: _llama(6, 6, tie=True, family="qwen2"), "qwen2 6 heads (q/k/v bias)")
    _compare(mesh, lambda: _gpt2(6), "gpt2 6 heads")
    _compare(mesh, lambda: _bert(6), "bert 6 heads", generate=False)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_hf_models_match_dense(tp):
    assert all(shardwise.launch(hf_checks, tp, tp))


def plan_error_checks():
    mesh = shardwise.init_mesh(2)
    torch.manual_seed(0)
    model = _llama(4, 2, tie=True)
    with pytest.raises(ValueError, match=r"'model.layers.\*.self_attn.qproj' matches no module; .*q_proj"):
        parallelize(model, {"model.layers.*.self_attn.qproj": "colwise"}, mesh)
    with pytest.raises(TypeError, match="cannot shard 'model.norm'.*expected nn.Linear"):
        parallelize(model, {"model.norm": "colwise"}, mesh)
    with pytest.raises(ValueError, match="unknown style 'columnwise'"):
        parallelize(model, {"lm_head": "columnwise"}, mesh)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to an embedding that was sharded"):
        parallelize(copy.deepcopy(model), {"model.embed_tokens": "vocab"}, mesh)
    with pytest.raises(ValueError, match="no built-in plan for model_type=None"):
        for_model(torch.nn.Linear(2, 2))
    return True


def test_plan_errors_name_the_fix():
    assert all(shardwise.launch(plan_error_checks, 2))
