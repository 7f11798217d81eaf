"""Every ```python block of README.md runs as written (as its own script, in a fresh directory), so the
README cannot drift from the library. A block naming a Hugging Face folder (`folder = "..."`) gets a tiny
LlamaForCausalLM saved there instead. Blocks launch their own ranks: each runs as a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FOLDER = re.compile(r'^(\s*folder = )"[^"]*"', re.M)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def _tiny_llama(path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="pip install 'shardwise[hf]'")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_readme_has_the_documented_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 4, "README.md lost its python examples"
    assert any("plans.for_model(model)" in b for b in blocks)
    assert any("from_dense" in b and "vocab_parallel_cross_entropy" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs(index, tmp_path):
    code = python_blocks()[index]
    if FOLDER.search(code):
        _tiny_llama(tmp_path / "tiny-llama")
        code = FOLDER.sub(lambda m: f"{m.group(1)}{str(tmp_path / 'tiny-llama')!r}", code)
    script = tmp_path / f"readme_{index}.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)  # fmt: skip
    assert out.returncode == 0, f"README python block {index}:\n{code}\n{out.stdout[-2000:]}{out.stderr[-4000:]}"
