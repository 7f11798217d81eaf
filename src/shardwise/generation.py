"""Tensor-parallel decoding with a KV cache, for shardwise's GPT.

Every rank runs the same loop: the logits are gathered over tp, so each rank holds the same full
logits and, drawing from identically seeded generators, picks the same token. Each rank's cache
holds only its own kv heads."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .nn.attention import KVCache
from .nn.gpt import GPT


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """logits [b, vocab] -> token ids [b] drawn from softmax(logits / temperature), optionally among the top_k;
    the same draws on every rank given identically seeded generators."""
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """prompt: [b, s] int64 -> [b, s + max_new_tokens]. temperature 0: greedy; else sampling from
    softmax(logits / temperature), optionally among the top_k. `on_token(next_ids [b])` streams."""
    if prompt.dim() != 2 or prompt.dtype != torch.int64:
        raise ValueError(f"prompt must be int64 [batch, seq], got {prompt.dtype} {list(prompt.shape)}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("max_new_tokens and temperature must be >= 0 and top_k >= 1")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=prompt.device).manual_seed(seed)  # the same on every rank
    caches = [KVCache() for _ in model.blocks] if use_cache else None
    ids, step_input = prompt, prompt
    try:
        for _ in range(max_new_tokens):
            logits = model.full_logits(model(step_input, caches=caches))[:, -1].float()  # [b, vocab]
            next_ids = logits.argmax(dim=-1) if temperature == 0.0 else sample(logits, temperature, top_k, gen)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            step_input = next_ids[:, None] if use_cache else ids
            if on_token is not None:
                on_token(next_ids)
    finally:
        model.train(was_training)
    return ids
