"""`shardwise serve MODEL --tp N`: an OpenAI-compatible HTTP server on a tensor-parallel model.

Rank 0 runs uvicorn in a thread and the engine loop in its main thread, driving the other ranks through
serving.protocol; the other ranks follow. A rank that dies fails the whole launch: the launcher reaps the
rest and says which rank died."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch.distributed as dist

import shardwise

from ..serving import Decoder, Engine, Leader, follow
from ..serving.api import ServedModel, make_app
from ..serving.metrics import Metrics
from .registry import load_model_sharded, text_codec


def _chat_prompt(tokenizer):
    """The model's own chat template when its tokenizer has one; else plain 'role: content' lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lambda messages: "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _max_context(model, default: int) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)


def serve_rank(spec, tp: int, cfg: dict) -> None:
    mesh = shardwise.init_mesh(tp)
    model, tokenizer = load_model_sharded(spec, mesh)
    model.eval()
    pids = [None] * dist.get_world_size() if dist.is_initialized() else [None]
    if dist.is_initialized():
        dist.all_gather_object(pids, os.getpid())  # printed: a user (or test) can see the ranks
    decoder = Decoder(model)
    if mesh.tp_rank != 0:
        follow(decoder)
        return
    import uvicorn

    encode, decode = text_codec(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    engine = Engine(Leader(decoder), decode, set() if eos is None else {int(eos)}, Metrics(cfg["name"], tp))
    served = ServedModel(cfg["name"], encode, _chat_prompt(tokenizer), _max_context(model, cfg["max_context"]))
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
    print(f"serving on http://{cfg['host']}:{cfg['port']}/v1 (requests are served one at a time)", flush=True)
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
