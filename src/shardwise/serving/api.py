"""The OpenAI-compatible HTTP API of `shardwise serve` (FastAPI): POST /v1/completions and
/v1/chat/completions (streamed as server-sent events with `stream: true`), GET /v1/models, GET /metrics.

Bad requests get the OpenAI error body {"error": {"message", "type", "param", "code"}} with a 4xx status;
the request never reaches the engine, which keeps serving. Bodies are validated here, by hand, so that every
error has that shape (FastAPI's own validation answers 422 with another one)."""

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import Engine, GenerationRequest


@dataclass
class ServedModel:
    name: str  # what clients pass as "model"
    encode: Callable[[str], torch.Tensor]  # text -> [1, s] int64
    chat_prompt: Callable[[list[dict]], str]  # OpenAI messages -> the model's chat-formatted prompt text
    max_context: int  # prompt + generated tokens at most
    engine_note: str = ""  # how requests are decoded (batched fast decoder or the serial general path)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_response(exc: BadRequest):
    from fastapi.responses import JSONResponse

    kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
    body = {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {what} in [{low}, {high}], got {value!r}", param=name,
                         code="invalid_value")  # fmt: skip
    return value


def parse(body, served: ServedModel, chat: bool) -> tuple[dict, torch.Tensor]:
    """Validate a request body; returns (options, prompt ids [1, s]) or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") != served.name:
        raise BadRequest(f"The model {body.get('model')!r} does not exist: this server serves {served.name!r}",
                         param="model", code="model_not_found", status=404)  # fmt: skip
    if chat:
        messages = body.get("messages")
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise BadRequest("'messages' must be a non-empty list of {role, content} strings", param="messages")
        text, param = served.chat_prompt(messages), "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        text, param = prompt, "prompt"
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n", code="invalid_value")
    ids = served.encode(text)
    room = served.max_context - ids.shape[1]
    default_max = 16 if not chat else max(1, min(room, 512))
    max_tokens = _number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                         default_max, 1, 1 << 30, integer=True)  # fmt: skip
    if ids.shape[1] + max_tokens > served.max_context:
        raise BadRequest(f"This model's maximum context length is {served.max_context} tokens; the request has "
                         f"{ids.shape[1]} prompt tokens and max_tokens={max_tokens}: shorten the prompt or "
                         "lower max_tokens", param=param, code="context_length_exceeded")  # fmt: skip
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    options = {
        "max_tokens": max_tokens, "stop": stop, "stream": stream,
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        "seed": _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
    }  # fmt: skip
    return options, ids


def make_app(engine: Engine, served: ServedModel):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title=f"shardwise serve {served.name}")

    async def handle(request: Request, chat: bool):
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("the request body is not valid JSON") from None
            options, ids = parse(body, served, chat)
        except BadRequest as exc:
            engine.metrics.request_done("error")
            return error_response(exc)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(kind, payload):  # engine thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        seed = options["seed"] if options["seed"] is None else options["seed"] % 2**63
        job = GenerationRequest(ids, options["max_tokens"], sink, options["temperature"], options["top_p"], seed,
                                options["stop"])  # fmt: skip
        engine.submit(job)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": served.name}
        if options["stream"]:
            return StreamingResponse(_sse(events, job, head, chat), media_type="text/event-stream")
        text, done = [], None
        try:
            while done is None:
                kind, payload = await events.get()
                if kind == "text":
                    text.append(payload)
                elif kind == "error":
                    body = {"error": {"message": payload, "type": "server_error", "param": None, "code": None}}
                    return JSONResponse(body, status_code=500)
                else:
                    done = payload
        finally:
            if done is None:  # the client went away (or the request failed): stop decoding for it
                job.cancelled.set()
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}  # fmt: skip
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "finish_reason": done["finish_reason"], "logprobs": None}  # fmt: skip
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": done["text"], "finish_reason": done["finish_reason"], "logprobs": None}
        return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        model = {"id": served.name, "object": "model", "created": 0, "owned_by": "shardwise",
                 "max_context": served.max_context, "engine": served.engine_note}  # fmt: skip
        return {"object": "list", "data": [model]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _sse(events: asyncio.Queue, job: GenerationRequest, head: dict, chat: bool):
    """Server-sent events: one `data: {chunk}` per text piece, a last chunk with the finish reason, [DONE]."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | (
                {} if text is None else {"content": text}
            )
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': kind_name, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            kind, payload = await events.get()
            if kind == "text":
                yield chunk(payload, None)
            elif kind == "error":
                error = {"error": {"message": payload, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                break
            else:
                yield chunk(None, payload["finish_reason"])
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client left early (or we are done): the engine stops decoding for it
