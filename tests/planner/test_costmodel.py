"""Cost model, planner and calibration fit: numbers from formulas and published figures, no timing."""

import json
import subprocess
import sys

import pytest
from shardwise.costmodel import HARDWARE, PRESETS, Link, ModelConfig, best_chunks, plan, predict, ring_steps

import shardwise
from shardwise.planner.calibration import fit
from shardwise.planner.layouts import recommend


def test_ring_collectives():
    assert ring_steps("all_reduce", 4) == (6, 1.5)
    assert ring_steps("all_gather", 4) == (3, 0.75)
    assert ring_steps("reduce_scatter", 1) == (0, 0.0)
    link = Link(latency_s=1e-5, bandwidth=1e9)
    # an all-reduce is a reduce-scatter then an all-gather
    assert link.time("all_reduce", 2**20, 8) == pytest.approx(2 * link.time("reduce_scatter", 2**20, 8))


def test_fit_recovers_alpha_beta():
    points = [(n, 2e-4 + n / 1.5e9) for n in (4, 1024, 2**20, 2**24)]
    f = fit(points)
    assert f["alpha_s"] == pytest.approx(2e-4, rel=1e-6)
    assert f["bandwidth_GBps"] == pytest.approx(1.5, rel=1e-6)
    assert f["max_rel_error"] < 1e-9


def test_compute_and_memory_scale_with_tp():
    cfg, hw = PRESETS["llama-7b"], HARDWARE["h100-nvlink"]
    one, two = predict(cfg, hw, 1), predict(cfg, hw, 2)
    assert two.compute_s == pytest.approx(one.compute_s / 2)
    assert two.memory["params"] == pytest.approx(one.memory["params"] / 2)
    assert one.comm_s == 0 and two.comm_s > 0 and two.R > one.R
    sp = predict(cfg, hw, 2, sequence_parallel=True)
    assert sp.comm_s == pytest.approx(two.comm_s)  # same bytes: reduce-scatter + all-gather = all-reduce
    assert sp.memory["activations"] < two.memory["activations"]
    assert 6.5e9 < cfg.params < 7e9  # LLaMA-7B really has 6.74 B


def test_plan_7b_on_8_h100_recommends_a_fitting_degree():
    options = plan(PRESETS["llama-7b"], HARDWARE["h100-nvlink"], 8)
    best, why = recommend(options)
    assert best is not None and best.fits and best.tp in (2, 4, 8)
    assert not predict(PRESETS["llama-7b"], HARDWARE["h100-nvlink"], 1, 8).fits  # 7B + Adam > 80 GiB
    assert f"recommend tp={best.tp}" in why


def test_two_nodes_at_100g_keep_tp_inside_a_node():
    options = plan(PRESETS["llama-7b"], HARDWARE["h100-nvlink-100g"], 16)
    best, _ = recommend(options)
    assert best.tp <= 8 and not best.tp_spans_nodes
    across = next(p for p in options if p.tp == 16)
    assert across.tp_spans_nodes and across.R > 10 * best.R


def test_uneven_heads_are_planned():
    cfg = ModelConfig(hidden=576, ffn=1536, heads=9, kv_heads=3, layers=30, vocab=49152, seq=2048)
    tps = {p.tp for p in plan(cfg, HARDWARE["a100-pcie"], 8)}
    assert tps == {1, 2, 4, 8}  # 9 heads over 2, 4, 8 ranks: whole heads, unevenly


def test_best_chunks_trades_latency_for_overlap():
    assert best_chunks(alpha_s=1e-3, beta_s_per_byte=1e-12, nbytes=1e6, compute_s=1e-4) == 1  # latency-bound
    assert best_chunks(alpha_s=1e-6, beta_s_per_byte=1e-9, nbytes=1e7, compute_s=1e-2) > 2  # bandwidth-bound


def test_plan_cli(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "shardwise", "plan", "--model", "llama-7b", "--devices", "16",
           "--hardware", "h100-nvlink-100g", "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "R(m)" in run.stdout and "recommend tp=8" in run.stdout and "tp spans nodes" in run.stdout
    assert json.loads(out.read_text())["recommended_tp"] == 8
    bad = subprocess.run([sys.executable, "-m", "shardwise", "plan", "--model", "llama-7b", "--devices", "8",
                          "--hardware", "tpu"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown hardware 'tpu'" in bad.stderr


def test_calibrate_then_plan_from_it(tmp_path):
    from shardwise.commands.calibrate import main

    out = tmp_path / "cal.json"
    result = main(2, str(out), max_bytes=64 * 1024, hidden=128, tokens=64)
    assert set(result["fits"]) == {"all_reduce", "all_gather", "reduce_scatter"}
    for f in result["fits"].values():
        assert f["alpha_s"] >= 0 and f["beta_s_per_byte"] > 0
    assert [n for n, _ in result["points"]["all_reduce"]] == [4 * 4**i for i in range(8)]  # 4 B .. 64 KiB
    assert result["matmul_flops"] > 1e6
    hw = shardwise.costmodel.from_calibration(str(out))
    assert predict(PRESETS["smollm2-135m"], hw, 2).comm_s > 0
