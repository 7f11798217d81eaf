"""The rank protocol of `shardwise serve`: rank 0 drives, the other ranks follow.

Each step rank 0 broadcasts a header, int64 [3] = (op, a, b), on the world group, then runs the model's
forward; the followers receive the same header and run the same forward, so the collectives inside the model
pair up. Ops:
    IDLE      nothing to do (a heartbeat every second, so an idle follower's broadcast never times out and a
              dead peer is noticed within a second)
    PREFILL   a = prompt length: a second broadcast carries the prompt ids [1, a]; caches start afresh
    STEP      a = the token id just chosen: one decode step on it
    END       the sequence is over: drop the caches
    SHUTDOWN  leave the loop
Tokens are chosen on rank 0 only (its logits are the full, gathered ones): followers never sample."""

from __future__ import annotations

import torch
import torch.distributed as dist

IDLE, PREFILL, STEP, END, SHUTDOWN = range(5)


class Decoder:
    """Prefill / decode steps of either kind of model (shardwise's GPT or a parallelized Hugging Face causal
    LM) with a KV cache. Returns the last position's full logits [vocab] (fp32) on every rank."""

    def __init__(self, model):
        from ..nn.gpt import GPT

        self.model = model
        self.is_gpt = isinstance(model, GPT)
        self.state = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [1, s] int64."""
        if self.is_gpt:
            from ..nn.attention import KVCache

            self.state = [KVCache() for _ in self.model.blocks]
        else:
            self.state = None
        return self._forward(ids)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        return self._forward(torch.tensor([[token]], dtype=torch.int64))

    def reset(self) -> None:
        self.state = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.is_gpt:
            return self.model.full_logits(self.model(ids, caches=self.state))[0, -1].float()
        out = self.model(ids, past_key_values=self.state, use_cache=True)
        self.state = out.past_key_values
        return out.logits[0, -1].float()


def _broadcast_header(op: int, a: int = 0, b: int = 0) -> torch.Tensor:
    header = torch.tensor([op, a, b], dtype=torch.int64)
    dist.broadcast(header, src=0)
    return header


class Leader:
    """Rank 0's side: every call broadcasts the step's work, then runs it locally."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.single = not dist.is_initialized() or dist.get_world_size() == 1

    def idle(self) -> None:
        if not self.single:
            _broadcast_header(IDLE)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.single:
            _broadcast_header(PREFILL, ids.shape[1])
            dist.broadcast(ids.contiguous(), src=0)
        return self.decoder.prefill(ids)

    def step(self, token: int) -> torch.Tensor:
        if not self.single:
            _broadcast_header(STEP, token)
        return self.decoder.step(token)

    def end(self) -> None:
        if not self.single:
            _broadcast_header(END)
        self.decoder.reset()

    def shutdown(self) -> None:
        if not self.single:
            _broadcast_header(SHUTDOWN)


def follow(decoder: Decoder) -> int:
    """A follower rank's loop: run what rank 0 broadcasts until SHUTDOWN. Returns the steps run."""
    steps = 0
    while True:
        header = torch.zeros(3, dtype=torch.int64)
        dist.broadcast(header, src=0)
        op, a = int(header[0]), int(header[1])
        if op == SHUTDOWN:
            return steps
        if op == PREFILL:
            ids = torch.empty(1, a, dtype=torch.int64)
            dist.broadcast(ids, src=0)
            decoder.prefill(ids)
        elif op == STEP:
            decoder.step(a)
        elif op == END:
            decoder.reset()
        elif op != IDLE:
            raise RuntimeError(f"serve: unknown op {op} from rank 0 (a version mismatch between ranks?)")
        steps += op in (PREFILL, STEP)
