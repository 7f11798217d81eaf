"""Calibration v2: structure of a real (quick) run on 4 ranks split as 2 nodes x 2, the GEMM interpolation,
the alpha-beta fit and the file reader, each against an independent reference. No timing asserts."""

import itertools
import json
import math

import numpy as np
import pytest

import shardwise
from shardwise.planner.calibration import calibrate_here, fit, gemm_time, load_calibration

WORLD, PER_NODE = 4, 2


@pytest.fixture(scope="module")
def cal(tmp_path_factory):
    """One launch: 4 local ranks acting as 2 "nodes" of 2 (structural classes; the link is loopback)."""
    result = shardwise.launch(calibrate_here, WORLD, None, True, 2**20, None, PER_NODE, timeout_s=300)
    assert result[1:] == [None] * (WORLD - 1)  # only rank 0 returns the dict
    path = tmp_path_factory.mktemp("cal") / "cal.json"
    path.write_text(json.dumps(result[0]))
    return result[0], path


def node(rank: int) -> int:
    return rank // PER_NODE  # torchrun's rule: a node's ranks are contiguous


def test_every_class_op_and_size_fitted(cal):
    c, _ = cal
    assert (c["version"], c["world"], c["nodes"], c["procs_per_node"]) == (2, WORLD, 2, PER_NODE)
    expected = {"intra": {"2"}, "inter": {"2", "4"}}  # 4 = the whole world across both nodes ("mixed")
    assert set(c["collectives"]) == set(expected)
    for link, sizes in expected.items():
        assert set(c["collectives"][link]) == {"all_reduce", "all_gather", "reduce_scatter"}
        for op, by_size in c["collectives"][link].items():
            assert set(by_size) == sizes, (link, op)
            for g, f in by_size.items():
                for fitted in (f, f["transfer_fit"]):
                    assert fitted["alpha_s"] >= 0 and 0 < fitted["beta_s_per_byte"] < 1e-3, (link, op, g, f)
                assert len(f["points"]) == 3 and all(t > 0 for _, t in f["points"]), f["points"]
                assert all(n % (4 * int(g)) == 0 and n <= 2**20 for n, _ in f["points"])  # full-tensor bytes
                assert f["concurrent_groups"] == len(f["groups"]) == WORLD // int(g)
    assert c["gemm"]["concurrent_ranks"] == WORLD and len(c["gemm"]["points"]) == 8
    assert all(p["fwd_s"] > 0 and p["bwd_s"] > 0 for p in c["gemm"]["points"])
    assert c["memory_bandwidth_Bps"] > 1e6 and 0 < c["op_overhead_s"] < 1e-2 and c["autograd_node_s"] > 0
    skew = c["rank_skew"]
    assert len(skew["points"]) == 2 and all(s > 0 and w >= 0 for s, w in skew["points"])
    assert skew["wait_const_s"] >= 0 and skew["wait_per_compute_s"] >= 0


def test_groups_are_what_their_class_claims(cal):
    c, _ = cal
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        intra = c["collectives"]["intra"][op]["2"]
        inter = c["collectives"]["inter"][op]["2"]
        mixed = c["collectives"]["inter"][op]["4"]
        for grp in intra["groups"]:
            assert len({node(r) for r in grp}) == 1, grp  # one node
        for grp in inter["groups"]:
            assert sorted(node(r) for r in grp) == [0, 1], grp  # one rank per node
        assert mixed["groups"] == [[0, 1, 2, 3]] and mixed["ranks_per_node"] == 2 and inter["ranks_per_node"] == 1
        for f in (intra, inter):  # the groups of one plan cover every rank once: all ranks busy
            assert sorted(r for grp in f["groups"] for r in grp) == list(range(WORLD))


def test_concurrent_groups_were_measured_at_the_same_time(cal):
    """Each group's measuring window (first call's start to last call's end, CLOCK_MONOTONIC) overlaps every
    other group's of the same plan: measured one group at a time, the windows would be disjoint."""
    c, _ = cal
    checked = 0
    for link, ops in c["collectives"].items():
        for op, by_size in ops.items():
            for g, f in by_size.items():
                starts, ends = zip(*f["windows"], strict=True)
                assert len(f["windows"]) == f["concurrent_groups"]
                if f["concurrent_groups"] > 1:
                    assert max(starts) < min(ends), (link, op, g, f["windows"])
                    checked += 1
    assert checked == 6  # intra 2 and inter 2, three ops each


def test_load_calibration_reads_v2_converts_v1_and_refuses_garbage(cal, tmp_path):
    c, path = cal
    assert load_calibration(path)["collectives"] == json.loads(json.dumps(c["collectives"]))
    v1 = {"tp": 2, "fits": {op: {"alpha_s": 1e-4, "beta_s_per_byte": 1e-9, "median_rel_error": 0.1}
                            for op in ("all_reduce", "all_gather", "reduce_scatter")},
          "points": {"all_reduce": [[4, 1e-4], [4096, 2e-4]]}, "matmul_flops": 2e10,
          "matmul_shape": {"hidden": 128, "tokens": 64}}  # fmt: skip
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(v1))
    conv = load_calibration(old)
    assert conv["version"] == 2 and conv["converted_from"] == 1
    assert conv["collectives"]["intra"]["all_reduce"]["2"]["alpha_s"] == 1e-4
    assert conv["collectives"]["intra"]["all_reduce"]["2"]["points"] == [[4, 1e-4], [4096, 2e-4]]
    # its one GEMM point carries the v1 rate: 2*m*k*n / 2e10 s forward at the MLP's [64, 128] x [128, 256]
    assert gemm_time(conv, 64, 128, 256, "fwd") == pytest.approx(2 * 64 * 128 * 256 / 2e10, rel=1e-12)
    for bad in ("not json", "[1, 2]", '{"version": 3}', '{"version": 2, "collectives": {}}', '{"tp": 2}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="shardwise calibrate"):
            load_calibration(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="shardwise calibrate"):
        load_calibration(tmp_path / "missing.json")


AXES = ([64, 512, 4096], [128, 1024], [64, 256, 2048])


def _hand_grid():
    """A full grid whose FLOP rate grows with every dimension (as real GEMM efficiency does)."""
    points = []
    for m, k, n in itertools.product(*AXES):
        rate = 1e9 * (math.log(m) + 0.5 * math.log(k) + 0.25 * math.log(n))
        points.append({"m": m, "k": k, "n": n, "fwd_s": 2 * m * k * n / rate, "bwd_s": 4 * m * k * n / (0.8 * rate)})
    return {"gemm": {"points": points}}, points


def _reference_log_rate(points, m, k, n, phase):
    """Independent reference: successive 1-D np.interp in log space along n, then k, then m."""
    factor = 2.0 if phase == "fwd" else 4.0
    table = {(p["m"], p["k"], p["n"]): math.log(factor * p["m"] * p["k"] * p["n"] / p[f"{phase}_s"]) for p in points}
    lm, lk, ln_ = (np.log(a) for a in AXES)
    along_n = np.array([[np.interp(math.log(n), ln_, [table[(a, b, c)] for c in AXES[2]]) for b in AXES[1]]
                        for a in AXES[0]])  # fmt: skip
    along_k = np.array([np.interp(math.log(k), lk, along_n[i]) for i in range(len(AXES[0]))])
    return float(np.interp(math.log(m), lm, along_k))


def test_gemm_time_exact_on_grid_and_log_linear_between():
    cal, points = _hand_grid()
    for p in points:
        for phase in ("fwd", "bwd"):
            assert gemm_time(cal, p["m"], p["k"], p["n"], phase) == pytest.approx(p[f"{phase}_s"], rel=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):  # anywhere inside (and beyond: clamped) the grid
        m, k, n = (float(np.exp(rng.uniform(math.log(a[0]) - 0.5, math.log(a[-1]) + 0.5))) for a in AXES)
        for phase in ("fwd", "bwd"):
            rate = math.exp(_reference_log_rate(points, m, k, n, phase))
            expected = (2.0 if phase == "fwd" else 4.0) * m * k * n / rate
            assert gemm_time(cal, m, k, n, phase) == pytest.approx(expected, rel=1e-9)
    for axis in range(3):  # monotone between neighbours (times grow along every axis here)
        base = [AXES[0][1], AXES[1][0], AXES[2][1]]
        lo, hi = AXES[axis][0], AXES[axis][-1]
        times = []
        for v in np.geomspace(lo, hi, 40):
            base[axis] = v
            times.append(gemm_time(cal, *base, "fwd"))
        assert all(b > a for a, b in zip(times, times[1:], strict=False)), axis
    with pytest.raises(ValueError, match="phase"):
        gemm_time(cal, 64, 128, 64, "both")


def test_gemm_time_fills_unmeasured_large_shapes_from_the_shapes_they_dominate():
    cal, points = _hand_grid()
    cal["gemm"]["points"] = [p for p in points if (p["m"], p["k"], p["n"]) != (4096, 1024, 2048)]
    best = max(2 * p["m"] * p["k"] * p["n"] / p["fwd_s"] for p in cal["gemm"]["points"])
    assert gemm_time(cal, 4096, 1024, 2048, "fwd") == pytest.approx(2 * 4096 * 1024 * 2048 / best, rel=1e-12)


def test_fit_recovers_alpha_beta_and_matches_weighted_lstsq():
    sizes = [4 * 4**i for i in range(12)]
    exact = [(n, 2e-4 + 7e-10 * n) for n in sizes]
    f = fit(exact)
    assert f["alpha_s"] == pytest.approx(2e-4, rel=1e-9) and f["beta_s_per_byte"] == pytest.approx(7e-10, rel=1e-9)
    assert f["median_rel_error"] < 1e-9
    rng = np.random.default_rng(1)
    noisy = [(n, t * float(rng.uniform(0.8, 1.25))) for n, t in exact]
    # independent: minimise sum(((a + b n - t) / t)^2) as lstsq of rows [1/t, n/t] against 1
    a = np.array([[1 / t, n / t] for n, t in noisy])
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones(len(noisy)), rcond=None)
    f = fit(noisy)
    assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)


def test_cli_parses_ranks_alias_and_refuses_bad_values(capsys):
    from shardwise.commands.cli import main

    for argv in (["calibrate", "--ranks", "0"], ["calibrate", "--tp", "2", "--max-mib", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "--ranks must be >= 1" in capsys.readouterr().err


# ---- measured CPU kernels (calibration_kernels.py) -------------------------------------------------------------


def test_quick_run_measures_attention_kernels_and_overheads(cal):
    from shardwise.planner.calibration_kernels import KINDS, QUICK_ATTN
    from shardwise.planner.profiles import from_calibration

    c, path = cal
    assert set(c["kernels"]) == set(KINDS) | {"accumulate"}
    for kind, k in c["kernels"].items():
        for phase in ("fwd", "bwd"):
            alpha, beta = k[phase]
            assert alpha >= 0 and 0 <= beta < 1e-5, (kind, phase, k)
        assert len(k["points"]) == 2 and all(n > 0 and f > 0 for n, f, _ in k["points"]), (kind, k["points"])
    grid = {(p["s"], p["d"]) for p in c["attention"]["points"]}
    assert grid == set(itertools.product(*QUICK_ATTN))
    for p in c["attention"]["points"]:
        assert all(p[ph][0] >= 0 and p[ph][1] > 0 for ph in ("fwd", "bwd")), p
    over = c["overhead"]
    assert 0 < over["aten_op_s"] < 1e-3 and over["autograd_node_s"] >= 0 and over["accumulate_grad_s"] >= 0
    assert over["counts"]["fwd_ops"] > 8 and over["counts"]["bwd_nodes"] > 8  # the profiler counted the chain
    hw = from_calibration(load_calibration(path))
    assert hw.kernels is not None and hw.attention(64, 32, 4, "bwd") > 0 and hw.aten_op_s == over["aten_op_s"]


def _attention_grid() -> dict:
    """Hand-made [alpha, per-unit] per (s, d): alpha = 1e-5 * (s/64)^0.5, per-unit = 1e-6 * s^2 d / 64^2 / 32,
    backward 2.5x (a power law: bilinear on logs is exact for it inside the grid)."""
    pts = []
    for s in (64, 256, 1024):
        for d in (32, 128):
            fwd = [1e-5 * (s / 64) ** 0.5, 1e-6 * s * s * d / (64 * 64 * 32)]
            pts.append({"s": s, "d": d, "fwd": fwd, "bwd": [2.5 * v for v in fwd]})
    return {"attention": {"points": pts}}


def test_attention_time_exact_on_grid_log_bilinear_between_and_s2_beyond():
    from shardwise.planner.calibration_kernels import attention_time

    cal = _attention_grid()
    for p in cal["attention"]["points"]:
        for phase in ("fwd", "bwd"):
            for units in (1, 8, 40):
                expected = p[phase][0] + p[phase][1] * units
                got = attention_time(cal, p["s"], p["d"], units, phase)
                assert got == pytest.approx(expected, rel=1e-12)
    # between grid points the power law comes back exactly (log-bilinear), independent of the brackets
    for s, d in ((128, 64), (100, 50), (700, 100)):
        expected = 1e-5 * (s / 64) ** 0.5 + 8 * 1e-6 * s * s * d / (64 * 64 * 32)
        assert attention_time(cal, s, d, 8, "fwd") == pytest.approx(expected, rel=1e-9)
    # beyond the grid: alpha clamped at the edge, per-unit scaled by the causal FLOPs s^2 d
    edge = 1e-5 * (1024 / 64) ** 0.5
    expected = edge + 3 * 1e-6 * 1024 * 1024 * 128 / (64 * 64 * 32) * (2048 / 1024) ** 2 * (256 / 128)
    assert attention_time(cal, 2048, 256, 3, "fwd") == pytest.approx(expected, rel=1e-12)


def test_fit_per_element_recovers_alpha_beta_and_never_goes_negative():
    from shardwise.planner.calibration_kernels import fit_per_element

    sizes = [2**10, 2**14, 2**18, 2**20]
    alpha, beta = fit_per_element([(n, 3e-6 + 1.7e-9 * n) for n in sizes])
    assert alpha == pytest.approx(3e-6, rel=1e-9) and beta == pytest.approx(1.7e-9, rel=1e-9)
    rng = np.random.default_rng(2)
    noisy = [(n, (3e-6 + 1.7e-9 * n) * float(rng.uniform(0.9, 1.1))) for n in sizes]
    a = np.array([[1 / t, n / t] for n, t in noisy])  # independent: weighted least squares of rows [1/t, n/t]
    (ref_alpha, ref_beta), *_ = np.linalg.lstsq(a, np.ones(len(noisy)), rcond=None)
    assert fit_per_element(noisy) == pytest.approx([ref_alpha, ref_beta], rel=1e-6)
    # a fixed part that would come out negative: the line through the origin instead (least squares)
    pts = [(1000, 1e-6), (2000, 3e-6)]
    ref = sum(n * t for n, t in pts) / sum(n * n for n, _ in pts)
    assert fit_per_element(pts) == pytest.approx([0.0, ref], rel=1e-12)


def test_quick_mode_chain_counts_are_what_the_profiler_counts():
    from shardwise.planner.calibration_kernels import QUICK_CHAIN_COUNTS, chain_counts

    assert chain_counts() == QUICK_CHAIN_COUNTS  # a torch upgrade that changes the dispatch: update the constant


def test_collective_points_are_the_mean_call_so_a_tail_counts():
    """A step pays the sum of its collectives, so a size's point is the MEAN over calls of the slowest rank's
    time (and the part after the last arrival, its mean too): with one call in ten 10x slower, as gloo's tail
    here, a median would say 1 ms where 20 calls cost 1.9 ms each on average."""
    from statistics import mean

    from shardwise.planner.calibration_measure import summarize

    calls = [1e-3] * 9 + [1e-2]  # per call, rank 0: 1 ms, one 10 ms outlier
    # rank 0 arrives at t, rank 1 arrives 0.2 ms later; both leave at t + call
    r0 = [[(10.0 * i, 10.0 * i + c) for i, c in enumerate(calls * 2)]]
    r1 = [[(10.0 * i + 2e-4, 10.0 * i + c) for i, c in enumerate(calls * 2)]]
    out = summarize([r0, r1], [(0, 1)], [4096])
    assert out["points"][0][1] == pytest.approx(mean(calls), rel=1e-9)  # slowest rank: rank 0's whole call
    assert out["after_last_arrival"][0][1] == pytest.approx(mean(calls) - 2e-4, rel=1e-9)


def test_step_like_extras_residuals_penalty_and_contention(cal):
    """What the model needs beyond the line: per measured size the residual (measured - line, so line + residual
    is the point again), the compute penalty after a collective, and on an oversubscribed host (4 ranks here on
    fewer cores) each 2-group plan's small collectives timed again beside computing siblings."""
    c, _ = cal
    assert c["post_collective_s"] >= 0
    for ops in c["collectives"].values():
        for by_size in ops.values():
            for f in by_size.values():
                line = lambda n: f["alpha_s"] + f["beta_s_per_byte"] * n  # noqa: E731, B023
                assert [[n, pytest.approx(t)] for n, t in f["points"]] == [[n, line(n) + r] for n, r in f["residuals"]]
                (n0, t0), (n1, t1) = sorted(f["points"])[-2:]  # the tail: the marginal s/byte of the largest sizes
                assert f["tail_beta_ratio"] == pytest.approx(max((t1 - t0) / (n1 - n0) / f["beta_s_per_byte"], 1))
    import os

    if WORLD <= len(os.sched_getaffinity(0)):
        pytest.skip(f"{WORLD} ranks on {len(os.sched_getaffinity(0))} cores: not oversubscribed, nothing contended")
    siblings = [f for ops in c["collectives"].values() for by in ops.values() for f in by.values()
                if f["concurrent_groups"] > 1]  # fmt: skip
    assert len(siblings) == 6 and all(f["contended"]["ratio"] >= 1.0 and f["contended"]["points"] for f in siblings)
    assert all("contended" not in f for ops in c["collectives"].values() for by in ops.values() for f in by.values()
               if f["concurrent_groups"] == 1)  # fmt: skip
