"""`shardwise generate`: stream tokens from a registered model at some tp, optionally checked against dense."""

from __future__ import annotations

import os
import time

import torch

import shardwise

from ..generation import generate, sample
from ..nn.gpt import GPT
from .registry import load_fast_decoder, load_model_dense, load_model_sharded, text_codec


def _run(model, tokenizer, prompt: torch.Tensor, cfg: dict, stream: bool, on_token=None) -> torch.Tensor:
    """Decode on this rank; print tokens as they come when `stream`; `on_token()` is called as each comes."""
    printed = []
    _, decode = text_codec(tokenizer)

    def show(next_ids: torch.Tensor) -> None:
        if on_token is not None:
            on_token()
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


def _run_fast(decoder, tokenizer, prompt: torch.Tensor, cfg: dict, stream: bool, on_token=None) -> tuple[list, list]:
    """Decode with the fast decoder (every rank): (new token ids, the decode steps' StepTimes)."""
    printed: list[int] = []
    _, decode = text_codec(tokenizer)
    gen = torch.Generator().manual_seed(cfg["seed"])  # the same draws on every rank

    def choose(local: torch.Tensor) -> torch.Tensor:
        if cfg["temperature"] == 0.0:
            return decoder.greedy(local)
        return sample(decoder.full_logits(local).float(), cfg["temperature"], cfg["top_k"], gen)

    steps = []
    eos = getattr(tokenizer, "eos_token_id", None)  # ends the text, as Hugging Face's generate does (kept in it)
    token = choose(decoder.prefill(0, prompt[0]))
    for i in range(cfg["max_new_tokens"]):
        if on_token is not None:
            on_token()
        printed.append(int(token[0]))
        if stream:
            text, previous = decode(printed), decode(printed[:-1])
            print(text[len(previous) :], end="", flush=True)
        if printed[-1] == eos:
            break
        if i + 1 < cfg["max_new_tokens"]:
            token = choose(decoder.decode([0], token))
            steps.append(decoder.last_step)
    return printed, steps


def _split(steps: list) -> dict:
    """Median per-token latency and its compute / communication parts over the decode steps (ms)."""
    if not steps:
        return {}
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"token_ms": 1e3 * med([s.seconds for s in steps]), "comm_ms": 1e3 * med([s.comm_seconds for s in steps]),
            "compute_ms": 1e3 * med([s.compute_seconds for s in steps]), "collectives": steps[-1].collectives,
            "p90_token_ms": 1e3 * sorted(s.seconds for s in steps)[int(0.9 * (len(steps) - 1))]}  # fmt: skip


def generate_rank(spec, tp: int, text: str, cfg: dict) -> dict | None:
    mesh = shardwise.init_mesh(tp)
    lead = mesh.tp_rank == 0
    engine = cfg.get("engine", "auto")
    decoder = None
    if engine != "model":
        max_len = cfg.get("max_len") or 0
        try:
            decoder, tokenizer = load_fast_decoder(spec, mesh, max_len=max_len or 512, compile=cfg.get("compile"))
        except TypeError as exc:
            if engine == "fast":
                raise
            if lead:
                print(f"(general path: {exc})".split(". Use")[0] + ")", flush=True)
    if decoder is None:
        model, tokenizer = load_model_sharded(spec, mesh)
    encode, decode = text_codec(tokenizer)
    prompt = encode(text)
    if decoder is not None and prompt.shape[1] + cfg["max_new_tokens"] > decoder.max_len:
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + --max-new-tokens {cfg['max_new_tokens']} exceed "
                         f"--max-len {decoder.max_len}; raise --max-len")  # fmt: skip
    if decoder is not None and cfg.get("compile") and cfg["max_new_tokens"] > 1:  # compile before the clock
        decoder.decode([0], decoder.greedy(decoder.prefill(0, prompt[0])))
    if lead:
        print(text, end="", flush=True)
    start = time.perf_counter()
    split = {}
    with torch.no_grad():
        if decoder is not None:
            new, steps = _run_fast(decoder, tokenizer, prompt, cfg, stream=lead)
            split = _split(steps)
        else:
            new = _run(model, tokenizer, prompt, cfg, stream=lead)[0, prompt.shape[1] :].tolist()
    seconds = time.perf_counter() - start
    if not lead:
        return None
    result = {"tokens": new, "text": decode(new), "seconds": seconds, "engine": "fast" if decoder else "model",
              "split": split}  # fmt: skip
    if cfg["check"]:
        dense, _ = load_model_dense(spec)
        with torch.no_grad():
            want = _run(dense, tokenizer, prompt, cfg, stream=False)
        result["dense_tokens"] = want[0, prompt.shape[1] :].tolist()
    return result


def generate_main(spec, model_name: str, tp: int, text: str, cfg: dict) -> int:
    mode = "greedy" if cfg["temperature"] == 0 else "sampled"
    threads = cfg.get("threads") or 1
    print(f"shardwise generate {model_name} on tp={tp} x {threads} thread(s) ({mode})")
    if cfg.get("threads"):  # each rank's intra-op threads (the launcher reads it)
        os.environ["OMP_NUM_THREADS"] = str(cfg["threads"])
    result = shardwise.launch(generate_rank, tp, spec, tp, text, cfg)[0]
    n = len(result["tokens"])
    print(f"\n{n} tokens in {result['seconds']:.2f} s: {n / max(result['seconds'], 1e-9):.1f} tokens/s (tp={tp}, "
          f"{result['engine']} path{', compiled' if cfg.get('compile') else ''})")  # fmt: skip
    split = result["split"]
    if split:
        print(f"per token (median of {n - 1} decode steps): {split['token_ms']:.1f} ms = compute "
              f"{split['compute_ms']:.1f} ms + communication {split['comm_ms']:.1f} ms in {split['collectives']} "
              f"collectives (p90 {split['p90_token_ms']:.1f} ms)")  # fmt: skip
    if cfg["check"]:
        same = result["dense_tokens"] == result["tokens"]
        print(f"dense model: {'same tokens' if same else 'DIFFERENT tokens: ' + repr(result['dense_tokens'])}")
        return 0 if same else 1
    return 0
