"""LinkEstimator on synthetic traces with a known link: recovery, forgetting, uncertainty, class assignment,
and agree() over real ranks with real (observed) collectives."""

import random

import pytest
from traces import dp_events, event, lab_hardware, machine_noise, skew, tp_events, true_time

import shardwise
from shardwise.adaptive import LinkEstimate, LinkEstimator, reference_link
from shardwise.planner.hardware import GroupSpan

LAT, RATE = 2e-4, 125e6  # per ring step; 1 Gbit/s
INTER = GroupSpan(2, "inter", 1)
INTRA = GroupSpan(2, "intra", 1)
NONE = GroupSpan(1, "none", 0)


def estimator(tp=INTER, dp=NONE, **kw) -> LinkEstimator:
    est = LinkEstimator(**kw)
    est.set_layout(tp, dp)
    return est


def feed(est, events):
    for e in events:
        est(e)  # the observer protocol, as comm.add_observer would call it


def test_recovers_alpha_beta_from_skewed_tp_trace():
    rng = random.Random(0)
    est = estimator()
    feed(est, tp_events(rng, LAT, RATE, lambda r: skew(r, 0.4), n=16))
    e = est.estimates()["inter"]
    assert e.fitted_alpha and e.samples == 48
    assert e.bandwidth_Bps == pytest.approx(RATE, rel=0.10)
    assert e.beta_s_per_byte == pytest.approx(1 / RATE, rel=0.10)
    assert e.alpha_s == pytest.approx(LAT, rel=0.5)  # latency: a few sizes, mostly bandwidth-bound
    assert e.link().time("all_reduce", 2**20, 2) == pytest.approx(true_time("all_reduce", 2, 2**20, LAT, RATE),
                                                                   rel=0.10)  # fmt: skip


def test_one_size_keeps_the_calibrated_latency_and_uses_async_inflight_time():
    """DDP's one bucket per step: beta alone, alpha from the prior (the lab calibration), time = inflight_s."""
    hw = lab_hardware()
    est = estimator(tp=NONE, dp=INTER, prior=hw)
    prior_lat = reference_link(hw, "inter").latency_s
    feed(est, dp_events(random.Random(1), prior_lat, RATE, lambda r: skew(r, 0.4), n=16))
    e = est.estimates()["inter"]
    assert not e.fitted_alpha and e.alpha_s == prior_lat
    assert e.bandwidth_Bps == pytest.approx(RATE, rel=0.10)


@pytest.mark.parametrize("change", [0.2, 5.0], ids=["drop-to-20%", "rise-5x"])
def test_rate_change_shows_within_the_window(change):
    rng, w = random.Random(2), 16
    est = estimator(window=w)
    noise = lambda r: skew(r, 0.4)  # noqa: E731
    feed(est, tp_events(rng, LAT, RATE, noise, n=3 * w))
    assert est.estimates()["inter"].bandwidth_Bps == pytest.approx(RATE, rel=0.10)
    feed(est, tp_events(rng, LAT, RATE * change, noise, n=w))  # one window of the new rate per bin
    assert est.estimates()["inter"].bandwidth_Bps == pytest.approx(RATE * change, rel=0.10)


def test_uncertainty_grows_with_noise():
    def uncertainty(spread):
        est = estimator()
        feed(est, tp_events(random.Random(3), LAT, RATE, lambda r: skew(r, spread, outliers=0.0), n=16))
        return est.estimates()["inter"].rel_uncertainty

    u = [uncertainty(s) for s in (0.0, 0.1, 0.4, 1.5)]
    assert u[0] == pytest.approx(0.0, abs=1e-9)
    assert u[0] < u[1] < u[2] < u[3]
    assert 0.02 < u[1] < 0.1 and 0.25 < u[3] < 1  # the median sample's bandwidth vs the envelope's


def test_events_go_to_the_class_of_their_group():
    """tp traffic -> the tp group's class, DDP's dp_grad_sync -> the dp group's; other group sizes ignored."""
    rng, fast, slow = random.Random(4), 10 * RATE, RATE
    est = estimator(tp=INTRA, dp=INTER)
    feed(est, tp_events(rng, LAT, fast, lambda r: 1.0, n=8) + dp_events(rng, LAT, slow, lambda r: 1.0, n=8))
    feed(est, [event("all_reduce", 4, 2**20, 1.0)])  # a 4-rank op: no group of this layout
    got = est.estimates()
    assert set(got) == {"intra", "inter"} and est.ignored == 1
    assert got["intra"].bandwidth_Bps == pytest.approx(fast, rel=0.05)
    assert got["inter"].bandwidth_Bps == pytest.approx(slow, rel=0.05)
    # the layout may come from a callable instead (the live mesh): swapped classes
    est2 = LinkEstimator(layout_spans=lambda: (INTER, INTRA))
    feed(est2, dp_events(rng, LAT, fast, lambda r: 1.0, n=8))
    assert set(est2.estimates()) == {"intra"}


def test_machine_noise_gives_a_stable_envelope():
    """+-40% and 3x outliers, two-sided: the envelope sits below the true time (a biased but steady estimate)."""
    rates = []
    est = estimator()
    rng = random.Random(5)
    for _ in range(20):
        feed(est, tp_events(rng, LAT, RATE, machine_noise, n=16))
        rates.append(est.estimates()["inter"].bandwidth_Bps)
    assert max(rates) / min(rates) < 1.4 and RATE < min(rates)  # the wobble the re-planner must ride out


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="window"):
        LinkEstimator(window=1)
    with pytest.raises(ValueError, match="quantile"):
        LinkEstimator(quantile=1.0)


# ---- agree(): one 2-rank launch -----------------------------------------------------------------------------
def _agree_checks():
    import torch
    import torch.distributed as dist

    from shardwise import comm
    from shardwise.data_parallel import wrap_ddp

    mesh = shardwise.init_mesh(1, 2)
    rank = dist.get_rank()
    out = {}
    # 1. real traffic: DDP's bucket all-reduces, observed through the choke point, land in the dp class
    est = LinkEstimator(window=8, min_samples=2)
    est.set_layout(GroupSpan(1, "none", 0), GroupSpan(2, "inter", 1))
    torch.manual_seed(0)
    model = wrap_ddp(torch.nn.Linear(64, 64), mesh)
    comm.add_observer(est)
    try:
        for _ in range(3):
            model(torch.randn(4, 64)).sum().backward()
    finally:
        comm.remove_observer(est)
    local = est.estimates()
    out["real_classes"] = sorted(local)
    out["real_agreed"] = {k: v.to_dict() for k, v in est.agree().items()}
    # 2. ranks that saw different links: the agreed estimate is the slowest rank's, identical everywhere
    syn = LinkEstimator()
    syn.set_layout(GroupSpan(2, "inter", 1), GroupSpan(2, "intra", 1))
    rate = 1e8 * (1 + rank)  # rank 0 saw the slower link
    for _ in range(4):
        for b in (2**16, 2**18, 2**20):
            syn.observe(event("all_reduce", 2, b, true_time("all_reduce", 2, b, 1e-4, rate)))
    if rank == 1:  # only rank 1 saw dp traffic: the class still appears everywhere
        for _ in range(4):
            syn.observe(event("all_reduce", 2, 2**22, true_time("all_reduce", 2, 2**22, 0.0, 5e8), dp=True))
    out["local_inter"] = syn.estimates()["inter"].to_dict()
    out["agreed"] = {k: v.to_dict() for k, v in syn.agree().items()}
    return out


def test_agree_gives_every_rank_identical_estimates():
    r0, r1 = shardwise.launch(_agree_checks, 2, timeout_s=120)
    assert r0["real_classes"] == ["inter"] and r0["real_agreed"] == r1["real_agreed"]
    assert r0["agreed"] == r1["agreed"] and set(r0["agreed"]) == {"inter", "intra"}
    inter = LinkEstimate.from_dict(r0["agreed"]["inter"])
    assert inter.bandwidth_Bps == pytest.approx(1e8, rel=1e-6)  # the slowest rank's view (MAX of beta)
    assert inter.beta_s_per_byte == max(r0["local_inter"]["beta_s_per_byte"], r1["local_inter"]["beta_s_per_byte"])
    assert r0["agreed"]["intra"]["bandwidth_Bps"] == pytest.approx(5e8, rel=1e-6)
