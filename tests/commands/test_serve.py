"""`shardwise serve gpt-tiny --tp 2` as a user runs it: one server (real CLI, two gloo ranks), many checks
over HTTP, then a rank is killed and the server must stop with a clear message and leave no process."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from shardwise.commands.registry import ModelSpec, load_model_dense
from shardwise.generation import generate
from shardwise.launch import free_port
from shardwise.serving.engine import choose

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "Hello"


def _dense_ids(prompt: str, n: int) -> list[int]:
    """The reference: gpt-tiny's weights in the plain-torch RefGPT (tests/nn/reference.py: no shardwise layer, no
    KV cache), greedy by argmax over the whole sequence each step. shardwise's own dense decode
    (generation.generate at tp=1, with its KV cache) must agree: a second opinion, not the reference."""
    from nn.reference import RefGPT
    from shardwise.commands.registry import GPT_TINY

    model, _ = load_model_dense(ModelSpec("gpt-tiny"))
    c = GPT_TINY
    ref = RefGPT(c.vocab_size, c.hidden, c.num_layers, c.num_heads, c.num_kv_heads, c.ffn_hidden, c.activation,
                 c.norm, c.bias)  # fmt: skip
    ref.load_state_dict(dict(model.named_parameters()))
    ids = torch.tensor([list(prompt.encode())], dtype=torch.int64)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, ref(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, -n:].tolist()
    assert generate(model, ids[:, :-n], n)[0, -n:].tolist() == new
    return new


def _dense_text(prompt: str, n: int) -> str:
    return bytes(_dense_ids(prompt, n)).decode("utf-8", errors="replace")


def _session_pids(sid: int) -> list[int]:
    """Processes still alive in the server's session (it was started in a new one)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def _stream(client, path: str, body: dict) -> tuple[str, list[dict]]:
    """(concatenated text, chunks) of a streamed request; asserts the SSE framing and the [DONE] end."""
    chunks, text = [], []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line[6:])
        chunks.append(chunk)
        choice = chunk["choices"][0]
        text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(text), chunks


def _samples(metrics: str) -> dict:
    """Prometheus text -> {(name, labels): value}; asserts every sample line parses."""
    samples = {}
    for line in metrics.splitlines():
        if not line.startswith("#"):
            m = re.fullmatch(r'([a-z_0-9]+)\{((?:[a-z_]+="[^"]*",?)*)\} (\S+)', line)
            assert m, line
            samples[(m.group(1), m.group(2))] = float(m.group(3))
    return samples


def test_serve_gpt_tiny_tp2_openai_api_then_a_rank_dies():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "shardwise",
        "serve",
        "gpt-tiny",
        "--tp",
        "2",
        "--port",
        str(port),
        "--timeout-s",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log = []
    try:
        deadline = time.monotonic() + 60
        while not any("serving on" in line for line in log):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            try:
                log.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        pids = json.loads(re.search(r"rank pids (\[[\d, ]+\])", "".join(log)).group(1))
        want = _dense_text(PROMPT, 12)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
        greedy = {"model": "gpt-tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}

        r = client.post("/v1/completions", json=greedy)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] == "length"
        assert out["choices"][0]["text"] == want  # tp=2 server == dense generate
        assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 12, "total_tokens": 17}
        text, chunks = _stream(client, "/v1/completions", greedy)
        assert text == want and chunks[-1]["choices"][0]["finish_reason"] == "length"

        # stop strings: the text ends before the first stop string, which is not part of it
        # (two characters: streaming must hold back a first one that the next token may complete into the stop)
        at = next(i for i in range(2, len(want) - 1) if "\ufffd" not in want[i : i + 2])
        stop = want[at : at + 2]
        r = client.post("/v1/completions", json={**greedy, "stop": [stop]})
        assert r.json()["choices"][0] == {"index": 0, "text": want[: want.index(stop)], "finish_reason": "stop",
                                          "logprobs": None}  # fmt: skip
        assert _stream(client, "/v1/completions", {**greedy, "stop": stop})[0] == want[: want.index(stop)]

        # chat: plain-text template (gpt-tiny has no tokenizer); streamed == not streamed
        chat = {"model": "gpt-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                "temperature": 0}  # fmt: skip
        r = client.post("/v1/chat/completions", json=chat).json()
        assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
        assert r["choices"][0]["message"]["content"] == _dense_text("user: hi\nassistant:", 6)
        text, chunks = _stream(client, "/v1/chat/completions", chat)
        assert text == r["choices"][0]["message"]["content"]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"

        # sampled: a seed reproduces, another seed (most likely) differs
        sampled = {**greedy, "temperature": 1.0, "top_p": 0.9, "max_tokens": 8}
        a, b, c = (client.post("/v1/completions", json={**sampled, "seed": s}).json() for s in (1, 1, 2))
        assert a["choices"][0]["text"] == b["choices"][0]["text"] != c["choices"][0]["text"]

        # 4 concurrent streaming requests: all complete, each with the greedy text
        results = [None] * 4
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _stream(client, "/v1/completions",
                                                                                      greedy)[0]))
                   for i in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == [want] * 4

        # 4 concurrent requests with different prompts and lengths: decoded together (a decode step had more than
        # one row, /metrics says), each with its solo greedy text (rows never mix: a slot gets its own tokens)
        prompts = {"Hello": 14, "The quick": 10, "abc": 16, "Zebra!": 12}
        solo = {p: _dense_text(p, n) for p, n in prompts.items()}
        batched = {}

        def one(p: str) -> None:
            body = {**greedy, "prompt": p, "max_tokens": prompts[p]}
            batched[p] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert batched == solo
        steps = _samples(client.get("/metrics").text)
        label = 'model="gpt-tiny",tp="2"'
        one_row = steps[("shardwise_serve_batch_size_bucket", f'le="1",{label}')]
        assert steps[("shardwise_serve_batch_size_count", label)] > one_row, "no decode step had 2+ rows"

        # the official openai client: same greedy text, streamed and not, completions and chat
        import openai

        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=15, max_retries=0)
        assert oai.completions.create(model="gpt-tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text \
            == want  # fmt: skip
        pieces = oai.completions.create(model="gpt-tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == want
        messages = [{"role": "user", "content": "hi"}]
        reply = oai.chat.completions.create(model="gpt-tiny", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == r["choices"][0]["message"]["content"]
        pieces = oai.chat.completions.create(model="gpt-tiny", messages=messages, max_tokens=6, temperature=0,
                                             stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="gpt-huge", prompt=PROMPT, max_tokens=2)

        # bad requests: OpenAI-style 4xx JSON errors, and the server keeps serving
        for body, status, param, code in (
            ({**greedy, "model": "gpt-huge"}, 404, "model", "model_not_found"),
            ({**greedy, "max_tokens": 5000}, 400, "prompt", "context_length_exceeded"),
            ({**greedy, "temperature": -1}, 400, "temperature", "invalid_value"),
            ({**greedy, "prompt": ""}, 400, "prompt", None),
        ):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code
        assert client.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == want
        assert client.get("/v1/models").json()["data"][0]["id"] == "gpt-tiny"

        # /metrics: Prometheus text; every sample line parses
        samples = _samples(client.get("/metrics").text)
        names = {name for name, _ in samples}
        expected = (
            "requests_total",
            "tokens_generated_total",
            "time_to_first_token_seconds_count",
            "token_latency_seconds_sum",
            "comm_seconds_per_token_sum",
            "tokens_per_second",
            "queue_length",
            "active_requests",
            "batch_size_count",
            "time_to_first_token_p99_seconds",
            "decode_step_seconds_sum",
            "decode_step_comm_seconds_sum",
        )
        for name in expected:
            assert f"shardwise_serve_{name}" in names, name
        tokens = samples[("shardwise_serve_tokens_generated_total", 'model="gpt-tiny",tp="2"')]
        assert tokens >= 12 * 10
        assert samples[("shardwise_serve_comm_seconds_per_token_sum", 'model="gpt-tiny",tp="2"')] > 0

        # a rank dies: the server stops with a message naming it, and nothing is left running
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=20) == 1
        while not lines.empty():
            log.append(lines.get())
        rest = "".join(log)
        assert "rank 1 was killed by signal 9" in rest, rest[-2000:]
        deadline = time.monotonic() + 15  # the launcher reaps its ranks and the fork server as it exits
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_pids(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_choose_top_p_keeps_the_nucleus():
    """Nucleus sampling against a hand count: probabilities 0.5, 0.3, 0.15, 0.05; top_p=0.75 keeps the first two."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([choose(logits, 1.0, 0.75, gen) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert choose(logits, 0.0, 0.1, gen) == 0


class _FakeLeader:
    """The rank protocol's leader without ranks, two slots: full logits [n, 8] from a script, NaN for a prompt
    starting with token 0."""

    max_batch = 2

    def __init__(self):
        self.nan, self.released = set(), []

    def _rows(self, slots):
        return torch.stack([torch.full((8,), float("nan")) if s in self.nan else torch.arange(8.0) for s in slots])

    def prefill(self, slot, ids, full):
        if int(ids.reshape(-1)[0]) == 0:
            self.nan.add(slot)
        return self._rows([slot]) if full else self._rows([slot]).argmax(-1)

    def step(self, slots, tokens, full):
        return self._rows(slots) if full else self._rows(slots).argmax(-1)

    def last_step(self):
        from shardwise.decoding import StepTime

        return StepTime(0.01, 0.002, 1)

    def release(self, slot):
        self.nan.discard(slot)
        self.released.append(slot)

    def idle(self):
        pass

    def shutdown(self):
        pass


def test_a_failing_request_gets_an_error_and_the_next_is_served():
    """NaN logits make sampling fail inside one request: that request gets an ("error", message) event (a 500 over
    HTTP), the followers are released (end), and the engine goes on to serve the next request."""
    from shardwise.serving.engine import Engine, GenerationRequest
    from shardwise.serving.metrics import Metrics

    leader = _FakeLeader()
    engine = Engine(leader, lambda ids: "".join(map(str, ids)), eos_ids=set(), metrics=Metrics("fake", 2))
    got = {0: [], 1: []}
    bad = GenerationRequest(torch.tensor([[0]]), 3, lambda k, p: got[0].append((k, p)), temperature=1.0, seed=1)
    good = GenerationRequest(torch.tensor([[1]]), 3, lambda k, p: got[1].append((k, p)), temperature=0.0)
    engine.submit(bad)
    engine.submit(good)
    runner = threading.Thread(target=engine.run, kwargs={"heartbeat_s": 0.05}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while not (got[1] and got[1][-1][0] == "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stopping.set()
    runner.join(5)
    assert [k for k, _ in got[0]] == ["error"] and "failed" in got[0][0][1], got[0]
    assert got[1][-1] == ("done", {"text": "777", "finish_reason": "length", "prompt_tokens": 1,
                                   "completion_tokens": 3}), got[1]  # fmt: skip
    assert sorted(leader.released) == [0, 1] and engine.metrics.requests.get("error") == 1


def _run_engine(leader, requests: dict[str, int]) -> tuple[dict[str, str], object]:
    """Submit greedy requests {prompt: max_tokens} all at once (so the first iteration admits them together), serve
    them in-process (one rank, no broadcasts) -> ({prompt: its token ids, space-separated}, engine)."""
    from shardwise.serving.engine import Engine, GenerationRequest
    from shardwise.serving.metrics import Metrics

    # the token ids as text, losslessly (gpt-tiny's bytes decode to many indistinguishable U+FFFD)
    engine = Engine(leader, lambda ids: " ".join(map(str, ids)), set(), Metrics("gpt-tiny", 1))
    done: dict[str, str] = {}
    for p, n in requests.items():
        sink = lambda k, payload, p=p: done.__setitem__(p, payload["text"]) if k == "done" else None  # noqa: E731
        engine.submit(GenerationRequest(torch.tensor([list(p.encode())]), n, sink, temperature=0.0))
    runner = threading.Thread(target=engine.run, kwargs={"heartbeat_s": 0.05}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while len(done) < len(requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stopping.set()
    runner.join(5)
    return done, engine


def test_batched_rows_keep_their_own_sequences_and_the_general_path_serves():
    """In-process, tp=1: three requests of different prompts and lengths admitted together and decoded in shared
    steps (3, then 2, then 1 rows) by the FastDecoder each get their solo greedy text (the plain-torch reference's),
    so rows never trade tokens or caches; the general path (GeneralDecoder, one slot) serves the same texts."""
    from shardwise.decoding import build_decoder
    from shardwise.mesh import Mesh
    from shardwise.serving import GeneralDecoder, Leader

    requests = {"Hello": 9, "The quick": 5, "abc": 7}
    solo = {p: " ".join(map(str, _dense_ids(p, n))) for p, n in requests.items()}
    model, _ = load_model_dense(ModelSpec("gpt-tiny"))
    fast = build_decoder(model, Mesh.single(), max_batch=4, max_len=64)
    texts, engine = _run_engine(Leader(fast), requests)
    assert texts == solo and engine.max_batch_seen == 3
    texts, engine = _run_engine(Leader(GeneralDecoder(model)), requests)
    assert texts == solo and engine.max_batch_seen == 1
