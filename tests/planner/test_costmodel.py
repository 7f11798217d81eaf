"""Cost model v2 and planner: predictions against hand calculations for small configs (no timing)."""

import json
import subprocess
import sys

import pytest
from shardwise.costmodel import (
    HARDWARE,
    PRESETS,
    Hardware,
    Link,
    ModelConfig,
    Prediction,
    best_chunks,
    block_config,
    from_calibration,
    measured_hardware,
    plan,
    predict,
    ring_steps,
)

from shardwise.planner.calibration import fit
from shardwise.planner.hardware import GroupSpan, tile_efficiency
from shardwise.planner.layouts import recommend
from shardwise.planner.topology import span
from shardwise.planner.workload import edge_ops

# b=2, s=64, h=128, 4 heads, no biases, MHA, RMSNorm: a layer's TP collectives are exactly Megatron's four
CFG = ModelConfig(hidden=128, ffn=512, heads=4, kv_heads=4, layers=2, vocab=256, seq=64, micro_batch=2,
                  dtype_bytes=4, swiglu=False, bias=False)  # fmt: skip
BSH = 2 * 64 * 128 * 4  # bytes of one [b, s, h] activation


def _hw(intra: Link | None = None, inter: Link | None = None, per_node: int = 2, **kw) -> Hardware:
    """2 nodes x `per_node` devices; links with no latency unless given; GEMMs at 1e12 FLOP/s."""
    return Hardware("test", 1e12, 2**40, per_node, intra or Link(0.0, 10e9), inter or Link(0.0, 1e9), **kw)


def _fake_calibration() -> dict:
    """A v2 calibration (interfaces.md schema) of 2 nodes x 2 ranks on gloo."""
    fit2 = lambda a, b: {"alpha_s": a, "beta_s_per_byte": b, "concurrent_groups": 2}  # noqa: E731
    ops = lambda a, b: {op: {"2": fit2(a, b)} for op in ("all_reduce", "all_gather", "reduce_scatter")}  # noqa: E731
    grid = [{"m": m, "k": k, "n": n, "fwd_s": 2 * m * k * n / 2e10, "bwd_s": 4 * m * k * n / 2e10}
            for m in (64, 512) for k in (64, 512) for n in (64, 512)]  # fmt: skip
    return {"version": 2, "host": "t", "date": "d", "backend": "gloo", "threads_per_rank": 1, "world": 4, "nodes": 2,
            "procs_per_node": 2, "link_rate": "100mbit", "collectives": {"intra": ops(1e-4, 1e-9),
                                                                        "inter": ops(5e-4, 8e-8)},
            "gemm": {"concurrent_ranks": 4, "points": grid}, "memory_bandwidth_Bps": 5e9,
            "op_overhead_s": 5e-6}  # fmt: skip


def test_ring_collectives():
    assert ring_steps("all_reduce", 4) == (6, 1.5)
    assert ring_steps("all_gather", 4) == (3, 0.75)
    assert ring_steps("reduce_scatter", 1) == (0, 0.0)
    link = Link(latency_s=1e-5, bandwidth=1e9)
    assert link.time("all_reduce", 2**20, 8) == pytest.approx(2 * link.time("reduce_scatter", 2**20, 8))


def test_fit_recovers_alpha_beta():
    points = [(n, 2e-4 + n / 1.5e9) for n in (4, 1024, 2**20, 2**24)]
    f = fit(points)
    assert f["alpha_s"] == pytest.approx(2e-4, rel=1e-6)
    assert f["bandwidth_GBps"] == pytest.approx(1.5, rel=1e-6)


def test_tp_comm_is_four_all_reduces_of_bsh_per_layer():
    lat, bw = 1e-5, 10e9
    p = predict(CFG, _hw(intra=Link(lat, bw)), 2)
    one = 2 * lat + 1.0 * BSH / bw  # ring all-reduce over 2 ranks: 2 steps, 2(m-1)/m = 1 of the tensor
    assert p.comm_s == pytest.approx(4 * one, rel=1e-12)
    assert p.layers[0]["comm_s"] == pytest.approx(4 * one, rel=1e-12) and p.R == pytest.approx(p.comm_s / p.compute_s)
    assert predict(CFG, _hw(intra=Link(lat, bw)), 1).comm_s == 0


def test_sequence_parallel_replaces_them_by_all_gather_and_reduce_scatter():
    lat, bw = 1e-5, 10e9
    hw4 = _hw(intra=Link(lat, bw), per_node=4)
    p = predict(CFG, hw4, 4, sequence_parallel=True)
    gather = 3 * lat + 0.75 * BSH / bw  # 4 ranks: 3 steps, 3/4 of the tensor
    # no shape agreement inside a layer (GPT checks the ids' shape once, at the embedding: the edge); the norm
    # grads are summed once per backward, in the edges
    assert p.comm_s == pytest.approx(8 * gather, rel=1e-12)


def test_sequence_parallel_shape_checks_and_one_coalesced_grad_sync(monkeypatch):
    lat, bw = 1e-5, 10e9
    hw4 = _hw(intra=Link(lat, bw), per_node=4)
    edge = [op for op in edge_ops(CFG, 4, True) if op.kind == "coll"]
    # embedding: checked reduce-scatter fwd, all-gather bwd; head: checked all-gather fwd, reduce-scatter bwd;
    # the loss's two all-reduces; ONE all-reduce of every replicated grad (per layer 2 RMSNorm weights, no biases
    # in CFG; the final norm): comm/grad_sync.py's sp_grad_sync
    grad_sync = [op for op in edge if op.op == "all_reduce" and op.phase == "bwd"]
    assert len(grad_sync) == 1 and grad_sync[0].nbytes == (CFG.layers * 2 + 1) * CFG.hidden * CFG.dtype_bytes
    # GPT checks shapes once per forward, before the embedding's reduce-scatter (comm.checks.shapes_agreed): one
    # all-gather of a 9 x int64 row per rank there, none in the layers
    assert [op.part for op in edge if op.nbytes == 9 * 8 * 4] == ["embed"]
    with_checks = predict(CFG, hw4, 4, sequence_parallel=True)
    monkeypatch.setenv("SHARDWISE_CHECK_SHAPES", "0")  # as the layers: no agreement, no tiny all-gather
    without = predict(CFG, hw4, 4, sequence_parallel=True)
    assert with_checks.comm_s == without.comm_s  # per layer: nothing checked
    assert with_checks.step_s - without.step_s == pytest.approx(
        with_checks.micro_steps * (3 * lat + 0.75 * 288 / bw), rel=1e-9)


def test_placement_decides_the_link_tp_crosses():
    hw = _hw(intra=Link(0.0, 10e9), inter=Link(0.0, 1e9))  # 2 nodes x 2 devices
    inner = predict(CFG, hw, 2, 4, placement="tp-inner")
    across = predict(CFG, hw, 2, 4, placement="dp-inner")
    assert (inner.tp_link, inner.dp_link, across.tp_link, across.dp_link) == ("intra", "inter", "inter", "intra")
    assert inner.comm_s == pytest.approx(4 * BSH / 10e9, rel=1e-12)
    # tp groups {0, 2} and {1, 3}: both cross the node link at once, each getting half of it
    assert across.comm_s == pytest.approx(4 * BSH / 0.5e9, rel=1e-12)


def test_groups_over_nodes_are_intra_inter_or_mixed():
    assert span(2, 2, "tp-inner", "tp", 2) == GroupSpan(2, "intra", 0, 2)
    assert span(2, 2, "tp-inner", "dp", 2) == GroupSpan(2, "inter", 2, 1)
    assert span(4, 1, "tp-inner", "tp", 2) == GroupSpan(4, "mixed", 1, 2)  # ring 0-1-2-3: one hop leaves each node
    hw = _hw(intra=Link(1e-6, 10e9), inter=Link(1e-4, 1e9))
    t = hw.collective("all_reduce", 1e6, span(4, 1, "tp-inner", "tp", 2))
    assert t == pytest.approx(6 * 1e-4 + 1.5 * 1e6 / 1e9)  # the ring paced by its inter hops


def test_calibration_fits_are_used_for_the_situation_they_measured():
    cal = _fake_calibration()
    hw = from_calibration(cal)
    p = predict(CFG, hw, 2, 4, placement="dp-inner")  # tp over nodes, 2 groups at once: as calibrated
    assert p.comm_s == pytest.approx(4 * (5e-4 + 8e-8 * BSH), rel=1e-12)
    q = predict(CFG, hw, 2, 4, placement="tp-inner")
    assert q.comm_s == pytest.approx(4 * (1e-4 + 1e-9 * BSH), rel=1e-12)
    assert hw.gemm_time(512, 64, 512, "fwd") == pytest.approx(2 * 512 * 64 * 512 / 2e10, rel=1e-6)
    # a 4-ring over 2 nodes: one flow per node link instead of the calibration's 2
    assert hw.collective("all_reduce", 1e6, GroupSpan(4, "mixed", 1, 2)) == pytest.approx(
        6 * 5e-4 / 2 + 1.5 * 1e6 / (1 / 8e-8 * 2), rel=1e-9
    )
    # once the world group (2 ranks on each node, alone) is measured, that fit is used for it as it is
    cal["collectives"]["inter"]["all_reduce"]["4"] = {"alpha_s": 1e-3, "beta_s_per_byte": 3e-8,
                                                      "concurrent_groups": 1, "ranks_per_node": 2}  # fmt: skip
    world = from_calibration(cal).collective("all_reduce", 1e6, span(4, 1, "tp-inner", "tp", 2))
    assert world == pytest.approx(1e-3 + 3e-8 * 1e6)
    # rank skew: every blocking collective first waits 10% of the compute before it
    cal["rank_skew"] = {"wait_per_compute_s": 0.1}
    skewed = predict(CFG, from_calibration(cal), 2, 4, placement="dp-inner")
    assert skewed.comm_s == pytest.approx(p.comm_s + 0.1 * p.compute_s, rel=1e-9)


def test_cpu_cannot_hide_tp_comm_and_ddp_competes_for_cores():
    hw = from_calibration(_fake_calibration())
    p = predict(CFG, hw, 2, overlap=True)
    assert p.exposed_comm_s == pytest.approx(p.comm_s)  # gloo: blocking on the compute thread
    gpu = predict(CFG, HARDWARE["h100-nvlink"], 2, overlap=True)
    assert gpu.exposed_comm_s < gpu.comm_s
    dp = predict(CFG, hw, 1, 4)  # dp=4 over 2 nodes, a mixed ring
    assert dp.dp_link == "mixed" and dp.dp_exposed_s > 0


def test_recompute_full_adds_one_forward():
    hw = _hw(intra=Link(0.0, 10e9))  # v1-style: GEMMs at 1e12 FLOP/s, element-wise not modelled
    none, full = predict(CFG, hw, 2), predict(CFG, hw, 2, recompute="full")
    T, h, f, s, d = 128, 128, 512, 64, 32
    gemms = 2 * T * h * (64 * 3) + 2 * T * 64 * h + 2 * T * h * (f // 2) * 2  # qkv, o, up + down per rank
    attention = 0.5 * 2 * 2 * (2 * 2) * s * s * d  # causal QK^T and AV, b=2 x 2 local heads
    assert full.compute_s - none.compute_s == pytest.approx((gemms + attention) / 1e12, rel=1e-9)
    assert full.comm_s - none.comm_s == pytest.approx(2 * BSH / 10e9, rel=1e-9)  # the forward's two all-reduces
    assert full.memory["activations"] < none.memory["activations"]


def test_zero_divides_optimizer_memory_by_dp():
    hw = _hw()
    plain, zero = predict(CFG, hw, 1, 4), predict(CFG, hw, 1, 4, zero=True)
    assert zero.memory["optimizer"] == pytest.approx(plain.memory["optimizer"] / 4)
    assert zero.breakdown["zero_gather"] > 0 and plain.breakdown["zero_gather"] == 0


def test_micro_batches_sync_dp_once_per_step():
    hw = from_calibration(_fake_calibration())
    one, four = predict(CFG, hw, 1, 4, micro_batches=1), predict(CFG, hw, 1, 4, micro_batches=4)
    assert four.micro_steps == 4 and four.dp_comm_s == pytest.approx(one.dp_comm_s)
    micro = one.step_s - one.dp_exposed_s - one.optimizer_s
    assert four.step_s == pytest.approx(one.step_s + 3 * micro, rel=1e-9)
    assert sum(four.breakdown.values()) == pytest.approx(four.step_s, rel=1e-9)


def test_tiles_and_waves():
    hw = Hardware("gpu", 4e12, 2**40, 8, Link(0, 1e9), Link(0, 1e9), memory_bandwidth=1e18, sms=4)
    full_wave = hw.gemm_time(256, 1024, 256)  # 2 x 2 tiles of 128: one wave on 4 SMs
    one_more = hw.gemm_time(640, 1024, 128)  # 5 tiles: two waves
    assert one_more == pytest.approx(2 * full_wave)
    assert full_wave == pytest.approx(2 * 128 * 128 * 1024 / 1e12)  # one tile's FLOPs at a quarter of the peak
    assert tile_efficiency(hw, 256, 256) == 1.0 and tile_efficiency(hw, 640, 128) == pytest.approx(5 / 8)


def test_slow_inter_link_keeps_tp_inside_a_node():
    hw = _hw(intra=Link(1e-5, 10e9), inter=Link(1e-3, 1e6))  # 2 nodes x 2, a very slow node link
    options = plan(CFG, hw, 4, micro_batches=16)  # tp comm every micro-batch, dp's once per step
    best, why = recommend(options, hw, CFG)
    assert best.tp == 2 and best.placement == "tp-inner" and best.tp_link == "intra"
    across = next(p for p in options if p.tp == 2 and p.placement == "dp-inner")
    assert across.step_s > 3 * best.step_s and "tp inside a node" in why


def test_one_device_that_holds_the_model_gets_no_tp():
    options = plan(PRESETS["smollm2-135m"], HARDWARE["a100-nvlink"], 8)
    best, why = recommend(options, HARDWARE["a100-nvlink"], PRESETS["smollm2-135m"])
    assert best.tp == 1 and "no TP (tp=1, dp=8)" in why and "TP would not pay: R=" in why


def test_v1_names_and_calls_still_work():
    cfg, hw = PRESETS["llama-7b"], HARDWARE["h100-nvlink"]
    one, two = predict(cfg, hw, 1), predict(cfg, hw, 2, 2, False, 2)
    assert one.comm_s == 0 and two.comm_s > 0 and one.compute_s / 2 < two.compute_s < one.compute_s
    assert isinstance(two, Prediction) and {"tp", "dp", "R", "step_s", "dp_comm_s", "memory", "fits"} <= set(
        two.to_dict()
    )
    assert 6.5e9 < cfg.params < 7e9
    fit1 = {"alpha_s": 1e-4, "beta_s_per_byte": 1e-9}
    p = predict(block_config(256, 4, 64, 1), measured_hardware(fit1, 1e10, 2), 2)
    assert p.comm_s > 0 and p.compute_s > 0
    tps = {p.tp for p in plan(PRESETS["smollm2-135m"], HARDWARE["a100-pcie"], 8)}
    assert tps == {1, 2, 4, 8}  # 9 heads over 2, 4, 8 ranks: whole heads, unevenly
    assert best_chunks(alpha_s=1e-3, beta_s_per_byte=1e-12, nbytes=1e6, compute_s=1e-4) == 1
    assert best_chunks(alpha_s=1e-6, beta_s_per_byte=1e-9, nbytes=1e7, compute_s=1e-2) > 2


def test_plan_cli(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "shardwise", "plan", "--model", "llama-7b", "--devices", "16",
           "--hardware", "h100-nvlink-100g", "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "R(m)" in run.stdout and "recommend tp=8" in run.stdout and "tp spans nodes" in run.stdout
    assert "placement tp-inner: tp inside a node" in run.stdout
    assert json.loads(out.read_text())["recommended_tp"] == 8
    bad = subprocess.run([sys.executable, "-m", "shardwise", "plan", "--model", "llama-7b", "--devices", "8",
                          "--hardware", "tpu"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "unknown hardware 'tpu'" in bad.stderr


def test_measured_kernels_time_each_op_by_its_kind():
    """A calibration with measured kernels: a GELU op costs the measured GELU line, per element (hand
    computed); in a real layer's op list the MLP's GELU over [tokens, ffn] is timed by it; the attention
    core by the measured attention grid."""
    from shardwise.planner.profiles import from_calibration as from_cal
    from shardwise.planner.schedule import phase_times
    from shardwise.planner.workload import Op

    kinds = {k: {"fwd": [0.0, 0.0], "bwd": [0.0, 0.0]} for k in ("add", "layer_norm", "rms_norm", "rotary")}
    cal = _fake_calibration() | {"kernels": kinds | {"gelu": {"fwd": [2e-5, 3e-9], "bwd": [5e-5, 7e-9]}}}
    hw = from_cal(cal)
    op = Op("mlp", "ew", fwd_bytes=8.0 * 4096, bwd_bytes=12.0 * 4096, fwd_ops=1, bwd_ops=1, ew_kind="gelu",
            elems=4096)  # fmt: skip
    t = phase_times([op], CFG, hw, GroupSpan(1, "none"), False)
    assert t.fwd_compute == pytest.approx(2e-5 + 3e-9 * 4096, rel=1e-12)
    assert t.bwd_compute == pytest.approx(5e-5 + 7e-9 * 4096, rel=1e-12)
    # the same op on a calibration without kernels: bytes at memory bandwidth plus the op overhead
    plain = phase_times([op], CFG, from_cal(_fake_calibration()), GroupSpan(1, "none"), False)
    assert plain.fwd_compute == pytest.approx(8.0 * 4096 / 5e9 + 5e-6, rel=1e-12)
    # a real layer: only the GELU rate changes between the two, so compute moves by the rate x tokens x ffn
    slower = cal | {"kernels": kinds | {"gelu": {"fwd": [2e-5, 4e-9], "bwd": [5e-5, 9e-9]}}}
    cfg = ModelConfig.from_dict({**CFG.__dict__, "swiglu": False})
    tokens, ffn = cfg.seq * cfg.micro_batch, cfg.ffn
    diff = predict(cfg, from_cal(slower), 1).compute_s - predict(cfg, hw, 1).compute_s
    assert diff == pytest.approx((1e-9 + 2e-9) * tokens * ffn, rel=1e-9)
    tp2 = predict(cfg, from_cal(slower), 2).compute_s - predict(cfg, hw, 2).compute_s
    assert tp2 == pytest.approx((1e-9 + 2e-9) * tokens * ffn / 2, rel=1e-9)  # ffn/tp features per rank
    # the attention core: the measured grid's time for (s, d, batch x local heads)
    grid = [{"s": s, "d": d, "fwd": [1e-5, 1e-6], "bwd": [3e-5, 2e-6]} for s in (64, 256) for d in (32, 64)]
    fast, slow = (hw_cal | {"attention": {"points": grid}} for hw_cal in (cal, cal))
    slow["attention"] = {"points": [p | {"bwd": [3e-5, 5e-6]} for p in grid]}
    diff = predict(cfg, from_cal(slow), 1).compute_s - predict(cfg, from_cal(fast), 1).compute_s
    assert diff == pytest.approx(3e-6 * cfg.micro_batch * cfg.heads, rel=1e-9)


def test_a_fit_with_measured_residuals_bends_the_line_at_measured_sizes():
    """fit_time: alpha + beta * n plus the measured-minus-line residual interpolated in log bytes (held at the
    ends, never below 0): the lab's token bucket made 64 KiB 2 ms faster than the line; a scaled beta (a slower
    live link) adds its extra bytes-time in full."""
    from math import log

    from shardwise.planner.hardware import fit_time, tail_beta_ratio

    f = {"alpha_s": 1e-3, "beta_s_per_byte": 1e-8, "residuals": [[1024, 0.0], [65536, -2e-4], [2**22, 1e-3]]}
    line = lambda n: 1e-3 + 1e-8 * n  # noqa: E731
    assert fit_time(f, 1024) == pytest.approx(line(1024), rel=1e-12)
    assert fit_time(f, 65536) == pytest.approx(line(65536) - 2e-4, rel=1e-12)
    w = (log(2**14) - log(1024)) / (log(65536) - log(1024))  # 16 KiB: between the first two points
    assert fit_time(f, 2**14) == pytest.approx(line(2**14) - 2e-4 * w, rel=1e-12)
    assert fit_time(f, 8) == pytest.approx(line(8), rel=1e-12)
    assert fit_time(f, 2**26) == pytest.approx(line(2**26) + 1e-3, rel=1e-12)
    slower = {**f, "beta_s_per_byte": 2e-8}
    assert fit_time(slower, 65536) - fit_time(f, 65536) == pytest.approx(1e-8 * 65536, rel=1e-9)
    assert fit_time({**f, "residuals": [[4, -1.0]]}, 4) == 0.0
    # past the largest size, time grows at the measured tail's slope (tail_beta_ratio x beta), not the line's:
    # the line fitted through 8 B..4 MiB said 6.0 ns/B, the lab's 1 -> 4 MiB segment 8.6 (so did 7 MB, probed)
    tail = {**f, "tail_beta_ratio": 1.5}
    assert fit_time(tail, 2**26) == pytest.approx(line(2**26) + 1e-3 + 0.5 * 1e-8 * (2**26 - 2**22), rel=1e-12)
    assert fit_time(tail, 2**22) == pytest.approx(fit_time(f, 2**22), rel=1e-12)  # inside: the residuals alone
    slower_tail = {**tail, "beta_s_per_byte": 2e-8}  # a 2x slower link: the whole bytes-time beyond doubles
    beyond = lambda g: fit_time(g, 2**26) - fit_time(g, 2**22)  # noqa: E731
    assert beyond(slower_tail) == pytest.approx(2 * beyond(tail), rel=1e-12)
    # the ratio from the points: 1 -> 4 MiB at 8.6 ns/B over a 6.0 line; a flat (noisy) tail never goes below the
    # line (a ratio of 0 would make every larger message cost the same); fewer than two sizes: 1
    pts = [[2**20, 9e-3], [2**22, 9e-3 + 8.6e-9 * 3 * 2**20]]
    assert tail_beta_ratio({"beta_s_per_byte": 6e-9, "points": pts}) == pytest.approx(8.6 / 6.0, rel=1e-9)
    assert tail_beta_ratio({"beta_s_per_byte": 6e-9, "points": [pts[0], [2**22, 8e-3]]}) == 1.0
    assert tail_beta_ratio({"beta_s_per_byte": 6e-9, "points": pts[:1]}) == 1.0
    # a file written before the calibration stored the ratio gets it derived on load (fits that carry residuals)
    cal = _fake_calibration()
    older = cal["collectives"]["intra"]["all_reduce"]["2"]
    older.update(residuals=[[n, 0.0] for n, _ in pts], points=pts, beta_s_per_byte=6e-9)
    assert from_calibration(cal).fits[("intra", "all_reduce", 2)]["tail_beta_ratio"] == pytest.approx(8.6 / 6.0)
    # and the model uses it where the calibration measured exactly the group: it reaches a layer's comm
    hw = from_calibration(_fake_calibration())
    key = ("intra", "all_reduce", 2)
    plain = predict(CFG, hw, 2, 4).comm_s
    hw.fits[key] = {**hw.fits[key], "residuals": [[4, 5e-5], [2**30, 5e-5]]}
    assert predict(CFG, hw, 2, 4).comm_s == pytest.approx(plain + 4 * 5e-5, rel=1e-9)


def test_compute_after_each_blocking_collective_pays_the_calibrated_penalty():
    """post_collective_s per TP collective of the step, added to compute (R's denominator), none at tp=1."""
    base, slowed = _hw(intra=Link(1e-5, 10e9)), _hw(intra=Link(1e-5, 10e9), post_collective_s=3e-4)
    p0, p1 = predict(CFG, base, 2), predict(CFG, slowed, 2)
    assert p1.compute_s - p0.compute_s == pytest.approx(4 * 3e-4, rel=1e-9)  # Megatron's 4 all-reduces per layer
    assert p1.comm_s == p0.comm_s
    edge = sum(op.kind == "coll" for op in edge_ops(CFG, 2, False))
    assert p1.breakdown["compute"] - p0.breakdown["compute"] == pytest.approx(
        p1.micro_steps * (CFG.layers * 4 + edge) * 3e-4, rel=1e-9)
    assert predict(CFG, slowed, 1).compute_s == predict(CFG, base, 1).compute_s


def test_contended_collectives_cost_more_only_beside_sibling_groups():
    """On an oversubscribed host the calibration times each group's collectives again while the other groups
    compute (fit["contended"]["ratio"]); the model applies it to a group with siblings (tp=2 x dp=2: 2 tp groups)
    and not to a lone group (tp=4 x dp=1)."""
    cal = _fake_calibration()
    cal["collectives"]["intra"]["all_reduce"]["2"]["contended"] = {"points": [], "ratio": 2.5}
    hw = from_calibration(cal)
    lone = GroupSpan(2, "intra", 0, 2)  # groups=1
    pair = GroupSpan(2, "intra", 0, 2, groups=2)
    base = 1e-4 + 1e-9 * 4096
    assert hw.collective("all_reduce", 4096, lone) == pytest.approx(base, rel=1e-12)
    assert hw.collective("all_reduce", 4096, pair) == pytest.approx(2.5 * base, rel=1e-12)
    assert span(2, 2, "tp-inner", "tp", 2).groups == 2 and span(4, 1, "tp-inner", "tp", 2).groups == 1
    plain = predict(CFG, from_calibration(_fake_calibration()), 2, 4)
    assert predict(CFG, hw, 2, 4).comm_s == pytest.approx(2.5 * plain.comm_s, rel=1e-9)  # its 4 all-reduces
