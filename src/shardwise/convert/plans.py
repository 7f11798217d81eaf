"""Built-in plans for Hugging Face transformers architectures: LLaMA-family decoders (LLaMA, Mistral,
Qwen2), GPT-2 and BERT encoders. `for_model(model)` picks one by `model.config.model_type` and by
where the blocks sit (a bare `LlamaModel` or a `LlamaForCausalLM` around it)."""

from __future__ import annotations

import torch.nn as nn

from ..heads import head_layout
from ..mesh import Mesh
from .sequence import GatherSequence, SplitSequence
from .styles import FusedQKV, Heads, Patch, Rowwise

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def _prefix(model: nn.Module, probe: str, candidates: tuple[str, ...]) -> str:
    names = {name for name, _ in model.named_modules()}
    for prefix in candidates:
        if f"{prefix}{probe}" in names:
            return prefix
    raise ValueError(f"cannot find {probe!r} under any of {candidates} in {type(model).__name__}")


def _set_llama_heads(heads: Heads):
    def patch(attn: nn.Module, mesh: Mesh) -> None:
        lay = heads.layout(mesh)
        # HF repeats kv heads by num_key_value_groups; k/v projections were built to match (expanded
        # to one kv head per q head where an uneven split cut a group).
        attn.num_key_value_groups = lay.uniform_repeat or 1
        attn.num_heads = lay.q_heads  # read by some versions and by people; the reshapes use -1
        attn.num_key_value_heads = lay.kv_heads if lay.uniform_repeat else lay.q_heads

    return patch


def llama_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """sequence_parallel: between the attention and MLP regions each rank keeps s/tp tokens (norms included;
    see convert/sequence.py); the sequence length must be a multiple of tp."""
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    p = _prefix(model, "layers.0.self_attn.q_proj", ("model.", ""))
    layer = f"{p}layers.*"
    heads = {role: Heads(role, nh, nkv, d, expand_kv=True) for role in "qkvo"}
    plan = {
        f"{p}embed_tokens": "vocab",
        **{f"{layer}.self_attn.{role}_proj": style for role, style in heads.items()},
        f"{layer}.self_attn": Patch(_set_llama_heads(heads["q"])),
        f"{layer}.mlp.gate_proj": "colwise",
        f"{layer}.mlp.up_proj": "colwise",
        f"{layer}.mlp.down_proj": "rowwise",
    }
    if hasattr(model, "lm_head"):
        plan["lm_head"] = "colwise_gather"
    if sequence_parallel:
        sp = {f"{layer}.{norm}": "sp_norm" for norm in ("input_layernorm", "post_attention_layernorm")}
        plan |= sp | {
            f"{layer}.self_attn": (plan[f"{layer}.self_attn"], GatherSequence()),
            f"{layer}.self_attn.o_proj": Heads("o", nh, nkv, d, expand_kv=True, sequence_parallel=True),
            f"{layer}.mlp": GatherSequence(),
            f"{layer}.mlp.down_proj": Rowwise(sequence_parallel=True),
            f"{p}layers.0": SplitSequence(),  # positions and masks are made from the whole sequence before it
            f"{p}norm": ("sp_norm", GatherSequence(output=True)),
        }
    return plan


def gpt2_plan(model: nn.Module) -> dict:
    cfg = model.config
    nh, d = cfg.n_head, cfg.n_embd // cfg.n_head

    def patch(attn: nn.Module, mesh: Mesh) -> None:
        lay = head_layout(nh, nh, mesh.tp_size, mesh.tp_rank)
        attn.num_heads = lay.q_heads
        attn.split_size = lay.q_heads * d  # c_attn's local output is q|k|v of the local heads
        attn.embed_dim = lay.q_heads * d

    p = _prefix(model, "h.0.attn.c_attn", ("transformer.", ""))
    plan = {
        f"{p}wte": "vocab",
        f"{p}h.*.attn.c_attn": FusedQKV(nh, nh, d),
        f"{p}h.*.attn.c_proj": Heads("o", nh, nh, d),
        f"{p}h.*.attn": Patch(patch),
        f"{p}h.*.mlp.c_fc": "colwise",
        f"{p}h.*.mlp.c_proj": "rowwise",
    }
    if hasattr(model, "lm_head"):
        plan["lm_head"] = "colwise_gather"
    return plan


def bert_plan(model: nn.Module) -> dict:
    cfg = model.config
    nh, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def patch(attn: nn.Module, mesh: Mesh) -> None:
        lay = head_layout(nh, nh, mesh.tp_size, mesh.tp_rank)
        attn.num_attention_heads = lay.q_heads
        attn.all_head_size = lay.q_heads * d

    p = _prefix(model, "encoder.layer.0.attention.self.query", ("bert.", ""))
    layer = f"{p}encoder.layer.*"
    names = {name for name, _ in model.named_modules()}
    head = {"cls.predictions.decoder": "colwise_gather"} if "cls.predictions.decoder" in names else {}
    return head | {
        f"{p}embeddings.word_embeddings": "vocab",
        f"{layer}.attention.self.query": Heads("q", nh, nh, d),
        f"{layer}.attention.self.key": Heads("k", nh, nh, d),
        f"{layer}.attention.self.value": Heads("v", nh, nh, d),
        f"{layer}.attention.self": Patch(patch),
        f"{layer}.attention.output.dense": Heads("o", nh, nh, d),
        f"{layer}.intermediate.dense": "colwise",
        f"{layer}.output.dense": "rowwise",
    }


PLANS = {**{name: llama_plan for name in LLAMA_FAMILY}, "gpt2": gpt2_plan, "bert": bert_plan}


def for_model(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """The built-in plan for a transformers model, by its config.model_type. sequence_parallel: LLaMA family
    only."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLANS:
        raise ValueError(
            f"no built-in plan for model_type={model_type!r} ({type(model).__name__}); built-in: "
            f"{', '.join(sorted(PLANS))}. Write a plan: {{module-name pattern: style}} (see shardwise.parallelize)"
        )
    if not sequence_parallel:
        return PLANS[model_type](model)
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"sequence_parallel plans exist for {LLAMA_FAMILY}, not model_type={model_type!r}; "
                         "write a plan with SequenceParallelNorm / SplitSequence / GatherSequence styles")  # fmt: skip
    return llama_plan(model, sequence_parallel=True)
