"""The rank protocol of `shardwise serve`: rank 0 drives, the other ranks follow.

Both sides hold a decoder with FastDecoder's slot interface (shardwise.decoding.FastDecoder for Llama-family
models, GeneralDecoder below for any other model, one slot). Each op, rank 0 broadcasts a header on the world
group, int64 [4 + 2 * max_batch] = (op, a, b, c, slots[max_batch], tokens[max_batch]) (fixed width: one
broadcast per op, no length message first), then makes the decoder calls; the followers receive the same header
and make the same calls, so the collectives inside them pair up. Ops:
    IDLE      nothing to do (a heartbeat every second, so an idle follower's broadcast never times out and a
              dead peer is noticed within a second)
    PREFILL   a = slot, b = prompt length, c = 1 for full logits (a sampled request) else 0 (greedy): a second
              broadcast carries the prompt ids [b]; then prefill(slot, ids) and greedy or full_logits
    STEP      a = n rows, c as for PREFILL (1 when any row samples); slots[:n] and tokens[:n] carry each
              active slot and the token just chosen for it: decode(slots, tokens), then greedy or full_logits
    RELEASE   a = slot: the sequence in it is over (release(slot))
    SHUTDOWN  leave the loop
Tokens are chosen on rank 0 only (from greedy's ids or the full logits, which every rank receives); followers
discard them and never sample."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..comm import events
from ..decoding import StepTime

IDLE, PREFILL, STEP, RELEASE, SHUTDOWN = range(5)
HEAD = 4  # op, a, b, c


class GeneralDecoder:
    """FastDecoder's interface over the general model path (shardwise's GPT or a parallelized Hugging Face causal
    LM, whatever the plans shard): one slot (max_batch = 1: requests are served serially), the model's own KV
    cache. Its logits are already full [1, vocab] on every rank, so greedy and full_logits are local."""

    max_batch = 1

    def __init__(self, model):
        from ..nn.gpt import GPT

        self.model, self.is_gpt, self.state = model, isinstance(model, GPT), None
        self.last_step = StepTime()

    def _observe(self, event) -> None:  # the model's collective time (this rank's view)
        if isinstance(event, events.CollectiveEvent) and event.seconds is not None:
            self.last_step.comm_seconds += event.seconds
            self.last_step.collectives += 1

    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """ids: [s] int64 -> full logits of the last position [1, vocab] (fp32)."""
        if self.is_gpt:
            from ..nn.attention import KVCache

            self.state = [KVCache() for _ in self.model.blocks]
        else:
            self.state = None
        return self._forward(ids.reshape(1, -1))

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens.reshape(1, 1))

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def release(self, slot: int) -> None:
        self.state = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.last_step = StepTime()
        start = time.perf_counter()
        events.add_observer(self._observe)
        try:
            if self.is_gpt:
                logits = self.model.full_logits(self.model(ids, caches=self.state))[:, -1].float()
            else:
                out = self.model(ids, past_key_values=self.state, use_cache=True)
                self.state = out.past_key_values
                logits = out.logits[:, -1].float()
        finally:
            events.remove_observer(self._observe)
        self.last_step.seconds = time.perf_counter() - start
        return logits


def _pick(decoder, local: torch.Tensor, full: bool) -> torch.Tensor:
    """Collective: full logits [n, vocab] when `full`, else the greedy token ids [n]."""
    return decoder.full_logits(local) if full else decoder.greedy(local)


class Leader:
    """Rank 0's side: every call broadcasts the op, then makes the same decoder calls as the followers."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.max_batch = decoder.max_batch
        self.single = not dist.is_initialized() or dist.get_world_size() == 1

    def _send(self, op: int, a: int = 0, b: int = 0, c: int = 0, slots=(), tokens=()) -> None:
        if self.single:
            return
        header = torch.zeros(HEAD + 2 * self.max_batch, dtype=torch.int64)
        header[:HEAD] = torch.tensor([op, a, b, c])
        n = len(slots)
        header[HEAD : HEAD + n] = torch.as_tensor(slots, dtype=torch.int64)
        header[HEAD + self.max_batch : HEAD + self.max_batch + n] = torch.as_tensor(tokens, dtype=torch.int64)
        dist.broadcast(header, src=0)

    def idle(self) -> None:
        self._send(IDLE)

    def prefill(self, slot: int, ids: torch.Tensor, full: bool) -> torch.Tensor:
        """ids: [s] int64 -> full logits [1, vocab] when `full`, else the greedy token [1]."""
        ids = ids.reshape(-1).contiguous()
        self._send(PREFILL, slot, ids.numel(), int(full))
        if not self.single:
            dist.broadcast(ids, src=0)
        return _pick(self.decoder, self.decoder.prefill(slot, ids), full)

    def step(self, slots: list[int], tokens: list[int], full: bool) -> torch.Tensor:
        """One decode step for the active slots -> full logits [n, vocab] when `full`, else greedy ids [n]."""
        self._send(STEP, len(slots), 0, int(full), slots, tokens)
        local = self.decoder.decode(slots, torch.tensor(tokens, dtype=torch.int64))
        return _pick(self.decoder, local, full)

    def last_step(self) -> StepTime:
        """Time of the last prefill or step (seconds, comm_seconds, collectives) on rank 0."""
        return self.decoder.last_step

    def release(self, slot: int) -> None:
        self._send(RELEASE, slot)
        self.decoder.release(slot)

    def shutdown(self) -> None:
        self._send(SHUTDOWN)


def follow(decoder) -> int:
    """A follower rank's loop: make the calls rank 0 broadcasts until SHUTDOWN. Returns the model steps run."""
    steps, width = 0, HEAD + 2 * decoder.max_batch
    while True:
        header = torch.zeros(width, dtype=torch.int64)
        dist.broadcast(header, src=0)
        op, a, b, c = header[:HEAD].tolist()
        if op == SHUTDOWN:
            return steps
        if op == PREFILL:
            ids = torch.empty(b, dtype=torch.int64)
            dist.broadcast(ids, src=0)
            _pick(decoder, decoder.prefill(a, ids), bool(c))
        elif op == STEP:
            slots = header[HEAD : HEAD + a].tolist()
            tokens = header[HEAD + decoder.max_batch : HEAD + decoder.max_batch + a]
            _pick(decoder, decoder.decode(slots, tokens.clone()), bool(c))
        elif op == RELEASE:
            decoder.release(a)
        elif op != IDLE:
            raise RuntimeError(f"serve: unknown op {op} from rank 0 (a version mismatch between ranks?)")
        steps += op in (PREFILL, STEP)
