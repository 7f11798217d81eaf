"""The fast decoder against Hugging Face's LlamaForCausalLM (an independent implementation): prefill and decode
logits, batched slots at different positions, greedy tokens vs HF generate, and exactly two all-reduces per layer.

A tiny Llama with 9 q heads over 3 kv heads and an odd vocabulary: at tp=2 the head split is uneven and cuts a kv
group (kv heads held by both ranks, picked per q head) and the vocabulary is padded, the cases that go wrong."""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise.comm import events

transformers = pytest.importorskip("transformers")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=72, intermediate_size=70, num_hidden_layers=3,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=8, rope_theta=5000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _checks(tp: int) -> dict:
    from shardwise.decoding import build_decoder

    mesh = shardwise.init_mesh(tp)
    model = _tiny_llama()
    decoder = build_decoder(model, mesh, max_batch=3, max_len=24)
    layers = model.config.num_hidden_layers

    def hf_last(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1]

    worst = 0.0
    seqs = {0: [5, 17, 3, 99, 42, 7], 2: [11, 4]}  # two slots at different positions (slot 1 unused)
    for slot, ids in seqs.items():
        full = decoder.full_logits(decoder.prefill(slot, torch.tensor(ids)))[0]
        worst = max(worst, (full - hf_last(ids)).abs().max().item())
        torch.testing.assert_close(full, hf_last(ids), **TOL)
    counted: list[str] = []
    observe = lambda e: counted.append(e.op) if isinstance(e, events.CollectiveEvent) else None  # noqa: E731
    for step in range(5):  # batched steps: slot 2 before slot 0 (rows follow the slots' order)
        order = [2, 0]
        tokens = torch.tensor([(7 * step + 3 * s) % 101 for s in order])
        events.add_observer(observe)
        try:
            local = decoder.decode(order, tokens)
            chosen = decoder.greedy(local)
        finally:
            events.remove_observer(observe)
        full = decoder.full_logits(local)
        for row, slot in enumerate(order):
            seqs[slot].append(int(tokens[row]))
            want = hf_last(seqs[slot])
            torch.testing.assert_close(full[row], want, **TOL)
            worst = max(worst, (full[row] - want).abs().max().item())
            assert int(chosen[row]) == int(want.argmax()), (step, slot)
        assert decoder.last_step.comm_seconds <= decoder.last_step.seconds
    # Greedy generation from scratch in slot 1 == Hugging Face's own generate (its cache, its loop).
    prompt = [1, 2, 3, 50]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 4:]
    token = decoder.greedy(decoder.prefill(1, torch.tensor(prompt)))
    got = [int(token[0])]
    for _ in range(7):
        token = decoder.greedy(decoder.decode([1], token))
        got.append(int(token[0]))
    assert got == want.tolist(), (got, want.tolist())
    # Errors every rank raises alike, before any collective.
    errors = []
    for bad in (lambda: decoder.prefill(0, torch.arange(24)), lambda: decoder.decode([0, 2], torch.tensor([1]))):
        with pytest.raises(ValueError) as info:
            bad()
        errors.append(str(info.value))
    return {"worst": worst, "ops": counted, "layers": layers, "errors": errors}


def test_fast_decoder_matches_hugging_face():
    tp = 2  # tp=1 is the same code without collectives; tp=2 covers it plus the split
    results = shardwise.launch(_checks, tp, tp)
    for r in results:
        assert r["worst"] <= 1e-5
        per_step = len(r["ops"]) / 5
        # Megatron's minimum: two all-reduces per layer, plus one small all-gather for the greedy choice.
        assert per_step == (2 * r["layers"] + 1 if tp > 1 else 0), r["ops"][: 2 * r["layers"] + 2]
        assert r["ops"].count("all_gather") == 5 * (2 * r["layers"] + 1)  # one-shot all-reduces: small messages
        assert "max_len" in r["errors"][0] and "one token per slot" in r["errors"][1]


def test_unsupported_models_name_the_general_path():
    from shardwise.decoding import dense_weights
    from shardwise.nn import GPT, GPTConfig

    with pytest.raises(TypeError, match="--engine model"):
        dense_weights(GPT(GPTConfig(activation="gelu"), shardwise.Mesh.single()))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=30))  # fmt: skip
    with pytest.raises(TypeError, match="Llama-family"):
        dense_weights(bert)
