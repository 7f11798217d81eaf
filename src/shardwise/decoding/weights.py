"""The weights of a Llama-family decoder (RMSNorm, rotary, SwiGLU, grouped-query attention, no biases) in one
canonical dense form, and this rank's fused shards of them for the fast decoder (engine.py).

Sources: a Hugging Face Llama-like causal LM (LlamaForCausalLM, SmolLM2, Mistral without sliding windows) or
shardwise's own GPT built dense (rmsnorm + swiglu + no bias, e.g. the registry's gpt-tiny). Anything else raises a
TypeError naming the general path (`generate --engine model`), which decodes any model the plans support."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import head_layout
from ..sharding import balanced_range


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int
    rope_theta: float
    norm_eps: float


@dataclass
class DenseWeights:
    """Full tensors. embed, lm_head: [vocab, hidden] (the same tensor when tied); layers: dicts of ln1 [h], q
    [heads*d, h], k, v [kv_heads*d, h], o [h, heads*d], ln2 [h], gate, up [ffn, h], down [h, ffn]; norm [h]."""

    config: DecoderConfig
    embed: torch.Tensor
    lm_head: torch.Tensor
    norm: torch.Tensor
    layers: list[dict[str, torch.Tensor]]


def _unsupported(what: str) -> TypeError:
    return TypeError(f"the fast decoder needs a Llama-family decoder (RMSNorm, rotary, SwiGLU, no biases); {what}. "
                     "Use the general path: `shardwise generate --engine model` / `serve --engine model`")  # fmt: skip


def dense_weights(model) -> DenseWeights:
    """The canonical weights of a dense (unsharded) model: a Hugging Face Llama-like causal LM or shardwise's GPT."""
    from ..nn.gpt import GPT

    if isinstance(model, GPT):
        return _from_gpt(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("llama", "mistral") or not hasattr(model, "model"):
        raise _unsupported(f"got {type(model).__name__}")
    return _from_llama(model)


def _from_llama(model) -> DenseWeights:
    c = model.config
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(f"rope_type {rope.get('rope_type')!r} is not implemented")
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) and c.model_type != "llama":
        raise _unsupported("sliding-window attention is not implemented")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise _unsupported(f"activation {c.hidden_act!r} is not SwiGLU")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    cfg = DecoderConfig(c.vocab_size, c.hidden_size, c.num_hidden_layers, heads, kv, head_dim, c.intermediate_size,
                        float(theta), float(c.rms_norm_eps))  # fmt: skip
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if any(getattr(m, "bias", None) is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            raise _unsupported("attention projections with biases are not implemented")
        if hasattr(attn, "q_norm"):
            raise _unsupported("q/k norms are not implemented")
        layers.append({"ln1": block.input_layernorm.weight, "q": attn.q_proj.weight, "k": attn.k_proj.weight,
                       "v": attn.v_proj.weight, "o": attn.o_proj.weight,
                       "ln2": block.post_attention_layernorm.weight, "gate": mlp.gate_proj.weight,
                       "up": mlp.up_proj.weight, "down": mlp.down_proj.weight})  # fmt: skip
    return DenseWeights(cfg, model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight, layers)


def _from_gpt(model) -> DenseWeights:
    c = model.config
    if model.mesh.tp_size != 1:
        raise ValueError("dense_weights needs the dense GPT (tp=1); the fast decoder shards it itself")
    if c.activation != "swiglu" or c.norm != "rmsnorm" or c.bias:
        raise _unsupported(f"got GPT(activation={c.activation!r}, norm={c.norm!r}, bias={c.bias})")
    first = model.blocks[0]
    cfg = DecoderConfig(c.vocab_size, c.hidden, c.num_layers, c.num_heads, c.num_kv_heads or c.num_heads,
                        first.attn.head_dim, first.mlp.up.weight.shape[0], first.attn.rope_theta,
                        first.norm1.eps)  # fmt: skip
    layers = [{"ln1": b.norm1.weight, "q": b.attn.q_proj.weight, "k": b.attn.k_proj.weight, "v": b.attn.v_proj.weight,
               "o": b.attn.o_proj.weight, "ln2": b.norm2.weight, "gate": b.mlp.gate.weight, "up": b.mlp.up.weight,
               "down": b.mlp.down.weight} for b in model.blocks]  # fmt: skip
    table = model.embed.weight[: c.vocab_size]
    return DenseWeights(cfg, table, table, model.norm.weight, layers)


@dataclass
class LocalWeights:
    """One rank's fused shards. Per layer: ln1 [h]; qkv [(q_l + 2 kv_l) * d, h] (this rank's q heads, then the kv
    heads they read); o [h, q_l * d]; ln2 [h]; gate_up [2 * f_l, h]; down [h, f_l]. embed [vocab, h] is held whole
    (a token's row is looked up locally: no all-reduce per token; it costs vocab*h per rank, the output head's
    [vocab/tp] rows are a view of it when tied); lm_head [V'/tp, h] with V' the vocabulary padded to a multiple
    of tp (padding rows zero, their logits masked); vocab_start: this rank's first row."""

    config: DecoderConfig
    tp: int
    rank: int
    q_heads: int
    kv_heads: int
    kv_index: list[int]  # for each local q head, the local kv head it reads
    kv_repeat: int | None  # r when local q head i reads local kv head i // r, None when the split cut a kv group
    vocab_start: int
    vocab_local: int  # real (unpadded) rows of lm_head on this rank
    embed: torch.Tensor
    lm_head: torch.Tensor
    norm: torch.Tensor
    layers: list[dict[str, torch.Tensor]]


def shard_weights(dense: DenseWeights, tp: int, rank: int, dtype: torch.dtype | None = None) -> LocalWeights:
    """Rank `rank` of `tp`'s fused, contiguous shards (copies: the dense tensors can be freed afterwards)."""
    c = dense.config
    lay = head_layout(c.num_heads, c.num_kv_heads, tp, rank)
    d = c.head_dim
    f0, f1 = balanced_range(c.ffn_hidden, tp, rank)
    q_rows, kv_rows = slice(lay.q_start * d, lay.q_stop * d), slice(lay.kv_start * d, lay.kv_stop * d)
    cast = (lambda t: t.detach().to(dtype).contiguous()) if dtype else (lambda t: t.detach().clone().contiguous())
    layers = []
    for w in dense.layers:
        layers.append({
            "ln1": cast(w["ln1"]),
            "qkv": cast(torch.cat([w["q"][q_rows], w["k"][kv_rows], w["v"][kv_rows]])),
            "o": cast(w["o"][:, q_rows]),
            "ln2": cast(w["ln2"]),
            "gate_up": cast(torch.cat([w["gate"][f0:f1], w["up"][f0:f1]])),
            "down": cast(w["down"][:, f0:f1]),
        })  # fmt: skip
    rows = -(-c.vocab_size // tp)  # padded vocabulary / tp
    start = rank * rows
    local = max(0, min(rows, c.vocab_size - start))
    embed = cast(dense.embed)
    if dense.lm_head is dense.embed and local == rows:
        head = embed[start : start + rows]  # tied: a view of the table this rank holds anyway
    else:
        head = torch.zeros(rows, c.hidden, dtype=embed.dtype)
        head[:local] = dense.lm_head.detach()[start : start + local]
    return LocalWeights(c, tp, rank, lay.q_heads, lay.kv_heads, lay.kv_index, lay.uniform_repeat, start, local, embed,
                        head, cast(dense.norm), layers)  # fmt: skip
