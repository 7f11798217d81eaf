"""A decoder where tensor parallelism pays: Megatron's two all-reduces per layer and nothing else on the token path.

What a decode step costs with a general model (`generate --engine model`, a parallelized Hugging Face module):
per token each rank runs the whole module tree's Python (~25 modules per layer, their hooks, cache objects,
mask building) and, at tp > 1, every collective's bookkeeping; on 2 cores that overhead is larger than the
GEMVs tp halves. This path keeps only the work itself:
  - fused weights per rank (q|k|v in one GEMM, gate|up in one GEMM), contiguous, built once (weights.py);
  - preallocated KV caches [layers][batch slots, local kv heads, max_len, head_dim], written in place;
  - rotary tables precomputed for max_len; the input embedding held whole (a lookup, no all-reduce);
  - per layer exactly two all-reduces of [n, hidden] (after o and after down: the minimum for Megatron TP, the
    RMSNorm between them is not linear), through the comm choke point so the profiler sees them. A decode
    step's all-reduce is a few KiB, so its cost is latency, not bandwidth: gloo's ring all-reduce makes 2(tp-1)
    dependent exchanges, a one-shot all-reduce (all-gather the partial sums, add them locally in rank order)
    makes one; `all_reduce="one_shot"` (the default up to 64 KiB per rank) uses it, the result is the same sum
    and bitwise identical on every rank (the same additions in the same order), `"ring"` keeps gloo's;
  - greedy decoding gathers each rank's (max, argmax) pair, 2 numbers per row, not the [n, vocab] logits;
  - `compile=True`: each layer's two compute segments (norm..o, norm..down) compiled with torch.compile
    (fullgraph, static shapes: attention over the whole max_len with a mask), collectives left outside them so
    their time is measured exactly, the same compiled graph serving every layer.
Per step it records the wall time and the part spent inside collectives (`last_step`): comm includes waiting
for the slower rank, compute is the rest.

Batching: `max_batch` slots; `prefill(slot, ids)` fills one slot, `decode(slots, tokens)` advances any set of
slots by one token in one step (what `serve` uses for concurrent requests)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..comm import all_gather, all_reduce_
from ..mesh import Mesh
from ..nn.attention import apply_rotary, rotary_tables
from .weights import LocalWeights


@dataclass
class StepTime:
    seconds: float = 0.0  # wall time of the step on this rank
    comm_seconds: float = 0.0  # inside collectives (transfer + waiting for the other ranks)
    collectives: int = 0

    @property
    def compute_seconds(self) -> float:
        return self.seconds - self.comm_seconds


def _qkv(x, ln1, qkv_w, cos, sin, *, eps: float, q_heads: int, kv_heads: int, head_dim: int):
    """x: [n, h] -> q [n, q_heads, d], k, v [n, kv_heads, d] of this rank's heads, rotary applied (cos, sin:
    [n, 1, d], each row's position)."""
    n, d = x.shape[0], head_dim
    qkv = F.linear(F.rms_norm(x, x.shape[-1:], ln1, eps), qkv_w)
    q, k, v = qkv.split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rotary(q.view(n, q_heads, d), cos, sin)
    return q, apply_rotary(k.view(n, kv_heads, d), cos, sin), v.view(n, kv_heads, d)


def _attention_part(x, ln1, qkv_w, o_w, cos, sin, k_cache, v_cache, slots, positions, visible, kv_index, *, eps: float,
                    q_heads: int, kv_heads: int, head_dim: int, gqa: bool, window: int):  # fmt: skip
    """One decode step's attention up to (not including) the all-reduce. x: [n, h] (one row per slot);
    k_cache, v_cache: [slots, kv_heads, max_len, d], written at (slots[i], positions[i]); visible: [n, 1, 1, window]
    bool; returns this rank's partial output [n, h]."""
    q, k, v = _qkv(x, ln1, qkv_w, cos, sin, eps=eps, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    keys, values = k_cache[slots, :, :window], v_cache[slots, :, :window]  # [n, kv, window, d]
    if not gqa:  # an uneven split cut a kv group: pick each q head's kv head
        keys, values = keys.index_select(1, kv_index), values.index_select(1, kv_index)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible, enable_gqa=gqa)
    return F.linear(out.reshape(x.shape[0], q_heads * head_dim), o_w)


def _mlp_part(x, ln2, gate_up_w, down_w, *, eps: float):
    """x: [n, h] (after the attention residual) -> this rank's partial MLP output [n, h]."""
    gate, up = F.linear(F.rms_norm(x, x.shape[-1:], ln2, eps), gate_up_w).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down_w)


class FastDecoder:
    """Inference-only decoder over one rank's LocalWeights. Every rank of the tp group makes the same calls."""

    def __init__(self, weights: LocalWeights, mesh: Mesh, max_batch: int = 1, max_len: int = 512,
                 compile: bool = False, all_reduce: str = "auto"):  # fmt: skip
        c = weights.config
        if weights.tp != mesh.tp_size or weights.rank != mesh.tp_rank:
            raise ValueError(f"weights were sharded for rank {weights.rank} of tp={weights.tp}, the mesh is rank "
                             f"{mesh.tp_rank} of tp={mesh.tp_size}")  # fmt: skip
        if all_reduce not in ("auto", "one_shot", "ring"):
            raise ValueError(f"all_reduce must be 'auto', 'one_shot' or 'ring', got {all_reduce!r}")
        self.all_reduce = all_reduce
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        self.w, self.mesh, self.config = weights, mesh, c
        self.max_batch, self.max_len, self.compiled = max_batch, max_len, compile
        dtype = weights.embed.dtype
        shape = (max_batch, weights.kv_heads, max_len, c.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in range(c.num_layers)]
        self.lengths = [0] * max_batch  # tokens cached per slot
        d = c.head_dim
        cos, sin = rotary_tables(torch.arange(max_len), d, c.rope_theta)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)  # [max_len, d]
        self.kv_index = torch.tensor(weights.kv_index, dtype=torch.int64)
        self._heads = dict(eps=c.norm_eps, q_heads=weights.q_heads, kv_heads=weights.kv_heads, head_dim=d)
        shapes = dict(self._heads, gqa=weights.kv_repeat is not None)
        self._attn = lambda *a, window: _attention_part(*a, window=window, **shapes)  # noqa: E731
        self._mlp = lambda *a: _mlp_part(*a, eps=c.norm_eps)  # noqa: E731
        if compile:
            attn_c = torch.compile(_attention_part, fullgraph=True, dynamic=False)
            mlp_c = torch.compile(_mlp_part, fullgraph=True, dynamic=False)
            self._attn = lambda *a, window: attn_c(*a, window=max_len, **shapes)  # noqa: E731  static shapes
            self._mlp = lambda *a: mlp_c(*a, eps=c.norm_eps)  # noqa: E731
        self.last_step = StepTime()

    # ---- collectives (timed) ----

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp_size == 1:
            return x
        start = time.perf_counter()
        one_shot = self.all_reduce == "one_shot" or (
            self.all_reduce == "auto" and x.numel() * x.element_size() <= 1 << 16
        )
        if one_shot:  # [tp * n, h] partial sums -> summed in rank order (the same bits on every rank)
            parts = all_gather(x, 0, self.mesh, "decode", "forward", check_shape=False)
            out = parts.view(self.mesh.tp_size, *x.shape).sum(dim=0)
        else:
            out = all_reduce_(x, self.mesh, "decode", "forward")
        self.last_step.comm_seconds += time.perf_counter() - start
        self.last_step.collectives += 1
        return out

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, k] per rank -> [n, k * tp] (rank order)."""
        if self.mesh.tp_size == 1:
            return x
        start = time.perf_counter()
        out = all_gather(x, -1, self.mesh, "decode_logits", "forward", check_shape=False)
        self.last_step.comm_seconds += time.perf_counter() - start
        self.last_step.collectives += 1
        return out

    # ---- the model ----

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, h] last hidden rows -> local logits [n, V'/tp], padding columns -inf."""
        logits = F.linear(F.rms_norm(x, x.shape[-1:], self.w.norm, self.config.norm_eps), self.w.lm_head)
        if self.w.vocab_local < logits.shape[-1]:
            logits[:, self.w.vocab_local :] = float("-inf")
        return logits

    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """ids: [s] int64, a new sequence for `slot` (its previous contents are dropped) -> local logits of the
        last position [1, V'/tp]. Runs eagerly (shapes vary per prompt)."""
        ids = ids.reshape(-1)
        s, c, w = ids.numel(), self.config, self.w
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} out of range (max_batch={self.max_batch})")
        if s < 1 or s >= self.max_len:
            raise ValueError(f"prompt of {s} tokens: needs 1 <= tokens < max_len={self.max_len}")
        self.last_step = StepTime()
        start = time.perf_counter()
        x = w.embed[ids]  # [s, h]
        cos, sin = self.cos[:s, None], self.sin[:s, None]
        for i, lw in enumerate(w.layers):
            q, k, v = _qkv(x, lw["ln1"], lw["qkv"], cos, sin, **self._heads)
            self.k_cache[i][slot, :, :s] = k.transpose(0, 1)
            self.v_cache[i][slot, :, :s] = v.transpose(0, 1)
            keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, kv, s, d]
            keys, values = keys.index_select(1, self.kv_index), values.index_select(1, self.kv_index)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, is_causal=True)
            x = x + self._all_reduce(F.linear(out[0].transpose(0, 1).reshape(s, -1), lw["o"]))
            x = x + self._all_reduce(_mlp_part(x, lw["ln2"], lw["gate_up"], lw["down"], eps=c.norm_eps))
        self.lengths[slot] = s
        logits = self._logits(x[-1:])
        self.last_step.seconds = time.perf_counter() - start
        return logits

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One step for `slots` (distinct, each prefilled): tokens [n] int64, each slot's newest token -> local
        logits [n, V'/tp] of the next position."""
        n = len(slots)
        if tokens.numel() != n or n == 0:
            raise ValueError(f"decode needs one token per slot: {n} slots, {tokens.numel()} tokens")
        positions_list = [self.lengths[s] for s in slots]
        if min(positions_list) == 0:
            raise ValueError(f"slot {slots[positions_list.index(0)]} was not prefilled")
        if max(positions_list) >= self.max_len:
            raise ValueError(f"a sequence reached max_len={self.max_len}; start the decoder with a larger max_len")
        self.last_step = StepTime()
        start = time.perf_counter()
        positions = torch.tensor(positions_list, dtype=torch.int64)
        slot_index = torch.tensor(slots, dtype=torch.int64)
        window = self.max_len if self.compiled else max(positions_list) + 1
        visible = (torch.arange(window)[None, :] <= positions[:, None])[:, None, None, :]  # [n, 1, 1, window]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        x = self.w.embed[tokens.reshape(-1)]  # [n, h]
        for i, lw in enumerate(self.w.layers):
            a = self._attn(x, lw["ln1"], lw["qkv"], lw["o"], cos, sin, self.k_cache[i], self.v_cache[i], slot_index,
                           positions, visible, self.kv_index, window=window)  # fmt: skip
            x = x + self._all_reduce(a)
            x = x + self._all_reduce(self._mlp(x, lw["ln2"], lw["gate_up"], lw["down"]))
        for s in slots:
            self.lengths[s] += 1
        logits = self._logits(x)
        self.last_step.seconds = time.perf_counter() - start
        return logits

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    # ---- choosing tokens (collective: every rank calls them) ----

    @torch.no_grad()
    def greedy(self, local_logits: torch.Tensor) -> torch.Tensor:
        """local logits [n, V'/tp] -> the argmax over the whole vocabulary [n] int64, the same on every rank, from
        each rank's (max, index) pair: 2 numbers per row cross the wire, not V/tp. Ties go to the lowest index,
        as torch.argmax over the full logits."""
        t0 = time.perf_counter()
        values, index = local_logits.max(dim=-1)
        pair = torch.stack([values.double(), (index + self.w.vocab_start).double()], dim=-1)  # [n, 2]
        pairs = self._gather(pair).view(pair.shape[0], -1, 2)  # [n, tp, 2]
        best = pairs[..., 0].argmax(dim=-1)  # first maximum: the lowest rank, so the lowest index
        self.last_step.seconds += time.perf_counter() - t0
        return pairs[torch.arange(pairs.shape[0]), best, 1].long()

    @torch.no_grad()
    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """local logits [n, V'/tp] -> [n, vocab] on every rank (an all-gather)."""
        t0 = time.perf_counter()
        out = self._gather(local_logits.contiguous())[:, : self.config.vocab_size]
        self.last_step.seconds += time.perf_counter() - t0
        return out


def build_decoder(model, mesh: Mesh, max_batch: int = 1, max_len: int = 512, compile: bool = False) -> FastDecoder:
    """A FastDecoder for this rank of `mesh` from a DENSE model (a Hugging Face Llama-like causal LM or shardwise's
    GPT at tp=1): its weights are fused and sharded here (TypeError for a model the fast path does not cover)."""
    from .weights import dense_weights, shard_weights

    local = shard_weights(dense_weights(model), mesh.tp_size, mesh.tp_rank)
    return FastDecoder(local, mesh, max_batch=max_batch, max_len=max_len, compile=compile)
