"""`shardwise serve MODEL --tp N`: an OpenAI-compatible HTTP server on a tensor-parallel model.

Rank 0 runs uvicorn in a thread and the engine loop in its main thread, driving the other ranks through
serving.protocol; the other ranks follow. A rank that dies fails the whole launch: the launcher reaps the
rest and says which rank died.

Llama-family models (gpt-tiny, SmolLM2, ...) decode with shardwise.decoding's FastDecoder and step-level batching
(--max-batch slots, --max-len tokens each). Any other model falls back to the general path (the parallelized
module, its own KV cache), one request at a time.

--compile: the decoder's compiled graphs have static shapes, so each decode batch size n (1..max_batch) compiles
its own graph the first time it occurs (a one-off pause of seconds; the recompile limit is raised to allow them).
Always decoding all max_batch slots would compile once but cost max_batch/n times the GEMV work at low load, and
FastDecoder only decodes prefilled slots; the graphs per size are the cheaper choice."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch.distributed as dist

import shardwise

from ..serving import Engine, GeneralDecoder, Leader, follow
from ..serving.api import ServedModel, make_app
from ..serving.metrics import Metrics
from .registry import load_fast_decoder, load_model_sharded, text_codec


def _chat_prompt(tokenizer):
    """The model's own chat template when its tokenizer has one; else plain 'role: content' lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lambda messages: "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _max_context(model, default: int) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)


def _load(spec, mesh, cfg: dict):
    """(decoder, tokenizer, max context, what the startup line says): the fast batched decoder when the model is of
    the Llama family (--engine auto|fast), else, or with --engine model, the general path (any model the plans
    shard; serial)."""
    try:
        if cfg["engine"] == "model":
            raise TypeError("--engine model")
        decoder, tokenizer = load_fast_decoder(spec, mesh, max_batch=cfg["max_batch"], max_len=cfg["max_len"],
                                               compile=cfg["compile"])  # fmt: skip
        if cfg["compile"]:
            import torch._dynamo

            limit = max(torch._dynamo.config.recompile_limit, cfg["max_batch"] + 2)  # a graph per batch size
            torch._dynamo.config.recompile_limit = limit
        how = f"fast decoder, batched: up to {cfg['max_batch']} requests per step{', compiled' * cfg['compile']}"
        return decoder, tokenizer, cfg["max_len"], how
    except TypeError as exc:
        if cfg["engine"] == "fast":
            raise TypeError(f"serve --engine fast: {exc}") from None
        model, tokenizer = load_model_sharded(spec, mesh)
        model.eval()
        why = str(exc).split(";")[0]
        how = f"general path, requests served one at a time ({why})"
        return GeneralDecoder(model), tokenizer, min(cfg["max_len"], _max_context(model, cfg["max_len"])), how


def serve_rank(spec, tp: int, cfg: dict) -> None:
    mesh = shardwise.init_mesh(tp)
    decoder, tokenizer, max_context, how = _load(spec, mesh, cfg)
    pids = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(pids, os.getpid())  # printed: a user (or test) can see the ranks
    if mesh.tp_rank != 0:
        follow(decoder)
        return
    import uvicorn

    encode, decode = text_codec(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    engine = Engine(Leader(decoder), decode, set() if eos is None else {int(eos)}, Metrics(cfg["name"], tp))
    served = ServedModel(cfg["name"], encode, _chat_prompt(tokenizer), max_context, how)
    server = uvicorn.Server(uvicorn.Config(make_app(engine, served), host=cfg["host"], port=cfg["port"],
                                           log_level="warning"))  # fmt: skip

    def run_http() -> None:
        try:
            server.run()
        finally:
            engine.stopping.set()  # the HTTP server is gone (bind failure, shutdown): stop the ranks too

    thread = threading.Thread(target=run_http, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        engine.leader.shutdown()
        raise RuntimeError(f"serve: could not listen on {cfg['host']}:{cfg['port']} (in use?): pick another --port")
    print(f"shardwise serve: {cfg['name']} on tp={tp}, rank pids {pids}", flush=True)
    print(f"serving on http://{cfg['host']}:{cfg['port']}/v1 ({how}; max context {max_context})", flush=True)
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def serve_main(spec, model_name: str, tp: int, cfg: dict) -> int:
    def terminate(signum, frame):  # SIGTERM: unwind like Ctrl-C, so launch() reaps the ranks
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    cfg = {"name": model_name, **cfg}
    try:
        shardwise.launch(serve_rank, tp, spec, tp, cfg, comm_timeout_s=cfg["timeout_s"])
    except KeyboardInterrupt:
        print("shardwise serve: stopped", flush=True)
        return 0
    except Exception as exc:  # noqa: BLE001 - a rank died or failed: say which, exit non-zero
        print(f"shardwise serve: the server stopped because a rank failed: {exc}", flush=True)
        return 1
    return 0
