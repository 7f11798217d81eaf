"""`shardwise generate`: stream tokens from a registered model at some tp, optionally checked against dense."""

from __future__ import annotations

import time

import torch

import shardwise

from ..generation import generate
from ..nn.gpt import GPT
from .registry import load_model_dense, load_model_sharded, text_codec


def _run(model, tokenizer, prompt: torch.Tensor, cfg: dict, stream: bool) -> torch.Tensor:
    """Decode on this rank; print tokens as they come when `stream`."""
    printed = []
    _, decode = text_codec(tokenizer)

    def show(next_ids: torch.Tensor) -> None:
        printed.append(int(next_ids[0]))
        if stream:  # re-decode the tail: a token may complete a multi-byte character only later
            text = decode(printed)
            previous = decode(printed[:-1])
            print(text[len(previous) :], end="", flush=True)

    if isinstance(model, GPT):
        return generate(model, prompt, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["seed"],
                        on_token=show)  # fmt: skip
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Stream(LogitsProcessor):  # called once per step with the ids so far: stream the newest token
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt.shape[1]:
                show(input_ids[:, -1])
            return scores

    torch.manual_seed(cfg["seed"])  # same draws on every rank
    sample = cfg["temperature"] > 0
    out = model.generate(
        prompt, max_new_tokens=cfg["max_new_tokens"], do_sample=sample,
        temperature=cfg["temperature"] if sample else None, top_k=cfg["top_k"] if sample else None,
        top_p=None, logits_processor=LogitsProcessorList([_Stream()]),
        pad_token_id=getattr(tokenizer, "eos_token_id", None),
    )  # fmt: skip
    if out.shape[1] > prompt.shape[1] + len(printed):
        show(out[:, -1])  # the last token has no step after it
    return out


def generate_rank(spec, tp: int, text: str, cfg: dict) -> dict | None:
    mesh = shardwise.init_mesh(tp)
    lead = mesh.tp_rank == 0
    model, tokenizer = load_model_sharded(spec, mesh)
    encode, decode = text_codec(tokenizer)
    prompt = encode(text)
    if lead:
        print(text, end="", flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = _run(model, tokenizer, prompt, cfg, stream=lead)
    seconds = time.perf_counter() - start
    if not lead:
        return None
    new = out[0, prompt.shape[1] :].tolist()
    result = {"tokens": new, "text": decode(new), "seconds": seconds}
    if cfg["check"]:
        dense, _ = load_model_dense(spec)
        with torch.no_grad():
            want = _run(dense, tokenizer, prompt, cfg, stream=False)
        result["dense_tokens"] = want[0, prompt.shape[1] :].tolist()
    return result


def generate_main(spec, model_name: str, tp: int, text: str, cfg: dict) -> int:
    print(f"shardwise generate {model_name} on tp={tp} ({'greedy' if cfg['temperature'] == 0 else 'sampled'})")
    result = shardwise.launch(generate_rank, tp, spec, tp, text, cfg)[0]
    n = len(result["tokens"])
    print(f"\n{n} tokens in {result['seconds']:.2f} s: {n / max(result['seconds'], 1e-9):.1f} tokens/s (tp={tp})")
    if cfg["check"]:
        same = result["dense_tokens"] == result["tokens"]
        print(f"dense model: {'same tokens' if same else 'DIFFERENT tokens: ' + repr(result['dense_tokens'])}")
        return 0 if same else 1
    return 0
