"""Plain-torch reference models, written here independently of shardwise: nn.Linear / nn.LayerNorm / nn.RMSNorm /
nn.Embedding, attention with an explicit causal masked softmax, rotate-half RoPE and repeat_interleave for GQA,
F.cross_entropy. Batch-first ([b, s, h]); parameter names equal the shardwise modules' so a gathered sharded
state dict (shardwise.sharding.full_parameters) loads with load_state_dict(strict=True)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefMLP(nn.Module):
    """x: [b, s, h] -> [b, s, h]: down(gelu(up(x))) or down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate = nn.Linear(hidden, ffn, bias=bias)
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.down = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE (the GPT-NeoX / LLaMA layout). x: [b, heads, s, d], positions 0..s-1."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)  # [s, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [s, d]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


class RefAttention(nn.Module):
    """Causal self-attention, x: [b, s, h] -> [b, s, h]. kv head j serves q heads j*g .. (j+1)*g - 1
    (g = heads / kv_heads): k and v are repeat_interleave'd over the head dim."""

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None, bias: bool = True,
                 use_rope: bool = False):  # fmt: skip
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.d = hidden // heads
        self.use_rope = use_rope
        self.q_proj = nn.Linear(hidden, heads * self.d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.d, bias=bias)
        self.o_proj = nn.Linear(heads * self.d, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.d).transpose(1, 2)  # [b, heads, s, d]
        k = self.k_proj(x).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.d).transpose(1, 2)
        if self.use_rope:
            q, k = rope(q), rope(k)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d)  # [b, heads, s, s]
        future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, s, self.heads * self.d)
        return self.o_proj(out)


def ref_norm(hidden: int, kind: str) -> nn.Module:
    return nn.LayerNorm(hidden, eps=1e-5) if kind == "layernorm" else nn.RMSNorm(hidden, eps=1e-5)


class RefBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then + mlp(norm2(.)). x: [b, s, h]."""

    def __init__(self, hidden: int, heads: int, ffn: int | None = None, kv_heads: int | None = None,
                 activation: str = "gelu", norm: str = "layernorm", bias: bool = True,
                 use_rope: bool = False):  # fmt: skip
        super().__init__()
        self.norm1 = ref_norm(hidden, norm)
        self.attn = RefAttention(hidden, heads, kv_heads, bias=bias, use_rope=use_rope)
        self.norm2 = ref_norm(hidden, norm)
        self.mlp = RefMLP(hidden, ffn or 4 * hidden, activation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefGPT(nn.Module):
    """ids [b, s] -> logits [b, s, vocab] (head tied to the embedding), or with targets the mean cross-entropy."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int | None = None,
                 ffn: int | None = None, activation: str = "gelu", norm: str = "layernorm",
                 bias: bool = True):  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            RefBlock(hidden, heads, ffn, kv_heads, activation, norm, bias, use_rope=True) for _ in range(layers)
        )
        self.norm = ref_norm(hidden, norm)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
