"""The detector: calibration maths, false alarms on over-dispersed healthy traffic, detection of
each fault on synthetic windows, the no-baseline rules, and a real Mixtral whose router is biased."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

import moewatch
from moewatch.baseline import Baseline
from moewatch.detector import AbsoluteDetector, BaselineDetector
from moewatch.detector.calibrate import _run_probability, persistent_threshold, sidak
from moewatch.detector.features import effective_experts, window_features
from moewatch.detector.nullmodel import _skewed_tails, scores
from tests.conftest import tiny_mixtral, until_first_verdict
from tests.detector_sim import HealthyTraffic


# -- calibration maths ---------------------------------------------------------------------------
def test_sidak_split_matches_formula_and_family_rate():
    beta = sidak(100_000, 64)
    assert beta == pytest.approx(1 - (1 - 1e-5) ** (1 / 64), rel=1e-9)
    assert 1 - (1 - beta) ** 64 == pytest.approx(1e-5, rel=1e-6)  # the family-wise rate comes back


def test_run_probability_against_independent_and_bivariate_normal():
    assert _run_probability(2.5, 0.0, 3) == pytest.approx(special.ndtr(-2.5) ** 3, rel=1e-12)
    mvn = stats.multivariate_normal(cov=[[1, 0.6], [0.6, 1]])
    assert _run_probability(1.2, 0.6, 2) == pytest.approx(mvn.cdf([-1.2, -1.2]), rel=2e-3)


def test_persistent_threshold_solves_its_equation_and_orders():
    target = 1e-8
    assert persistent_threshold(target, 0.0, 1) == pytest.approx(-special.ndtri(target))
    h2 = persistent_threshold(target, 0.3, 2)
    assert math.log(_run_probability(h2, 0.3, 2)) == pytest.approx(math.log(target), abs=1e-3)
    # a longer run, or less correlated windows, allow a lower threshold
    assert persistent_threshold(target, 0.3, 3) < h2 < persistent_threshold(target, 0.8, 2) < -special.ndtri(target)


def test_effective_experts_known_answers():
    # uniform over 4 experts: exp(ln 4 + (4 - 1) / (2 * 40)) with the Miller-Madow term
    assert effective_experts(np.array([10, 10, 10, 10])) == pytest.approx(4 * math.exp(3 / 80))
    assert effective_experts(np.array([50, 0, 0, 0])) == pytest.approx(1.0)
    assert np.isnan(effective_experts(np.zeros(4)))


# -- synthetic traffic ---------------------------------------------------------------------------
def _detector(sim: HealthyTraffic, windows: int = 120, ert: float = 100_000, persistence: int = 2):
    baseline = Baseline.from_frame(sim.frame(windows))
    return BaselineDetector(sim.gates, baseline, ert, persistence)


def test_false_alarm_rate_within_its_bound_on_overdispersed_traffic():
    """Dirichlet-multinomial routing (far from i.i.d.) with wandering scalars: the fraction of
    windows with an alarm on any gate stays under 1 / ERT (Poisson upper 99.9% bound)."""
    sim = HealthyTraffic(num_gates=8, experts=8, concentration=200.0, seed=3)
    ert, n = 100.0, 3000
    det = _detector(sim, ert=ert)
    alarms = sum(det.update(sim.window(), sim.gates).severity != "ok" for _ in range(n))
    bound = stats.poisson.ppf(0.999, n / ert)
    print(f"false alarms: {alarms} windows of {n} at ERT {ert:.0f} (expected at most {n / ert:.0f})")
    assert alarms <= bound
    # a plain multinomial chi-square on the same traffic pages constantly: the dispersion matters
    w = sim.window()
    p = det.params["p"][0, :8]
    counts = w.counts[0, 0]
    chi2 = ((counts - counts.sum() * p) ** 2 / (counts.sum() * p)).sum()
    assert stats.chi2.sf(chi2, 7) < 1e-4


def test_no_false_alarm_at_default_ert():
    sim = HealthyTraffic(num_gates=8, experts=16, seed=4)
    det = _detector(sim)
    verdicts = [det.update(sim.window(), sim.gates) for _ in range(1500)]
    assert all(v.severity == "ok" for v in verdicts)
    assert all(v.has_baseline and v.detector for v in verdicts)


def test_heavy_tailed_drop_rate_does_not_alarm_at_default_ert():
    """A healthy drop rate with a long upper tail (gamma, skewness 2.8): the scores follow a
    Pearson III fitted to the baseline's skewness, not a normal, so the tail beyond the
    baseline's largest windows does not page (a normal score would reach 8-10 here)."""
    sim = HealthyTraffic(num_gates=8, experts=8, seed=21, drop_shape=0.5)
    det = _detector(sim, windows=64)
    assert (det.params["drop_rate_g"] > 1.0).all()  # the skewness was seen
    verdicts = [det.update(sim.window(), sim.gates) for _ in range(4000)]
    fired = [c for v in verdicts for g in v.gates.values() for c, s in g.checks.items() if s != "ok"]
    assert fired == []


def test_skewed_tails_are_pearson_type_iii_on_the_heavy_side_and_normal_on_the_other():
    y = np.array([-3.0, -1.0, 0.0, 2.0, 5.0, 9.0])
    for g in (0.8, 2.5):
        hi, lo = _skewed_tails(y, np.full_like(y, g))
        np.testing.assert_allclose(hi, stats.pearson3.sf(y, g), rtol=1e-9)
        np.testing.assert_allclose(lo, special.ndtr(y), rtol=1e-12)
        hi, lo = _skewed_tails(-y, np.full_like(y, -g))
        np.testing.assert_allclose(lo, stats.pearson3.sf(y, g), rtol=1e-9)
        np.testing.assert_allclose(hi, special.ndtr(y), rtol=1e-12)
    # no skewness: a normal on both sides; a skewed tail is far heavier far out
    hi, lo = _skewed_tails(y, np.zeros_like(y))
    np.testing.assert_allclose(hi, special.ndtr(-y), rtol=1e-4)
    assert _skewed_tails(np.array([6.0]), np.array([1.5]))[0][0] > 1e4 * special.ndtr(-6.0)


def test_small_windows_do_not_alarm():
    sim = HealthyTraffic(num_gates=4, experts=8, seed=5)
    det = _detector(sim)
    for tokens in (1, 3, 16, 64):
        for _ in range(50):
            assert det.update(sim.window(tokens=tokens), sim.gates).severity == "ok"


@pytest.fixture(scope="module")
def fitted():
    sim = HealthyTraffic(num_gates=4, experts=8, seed=6)
    det = _detector(sim)
    until_first_verdict(lambda: det.update(sim.window(), sim.gates), limit=8)
    return sim, det


def _run(fitted, windows=2, **fault):
    sim, det = fitted
    verdicts = [det.update(sim.window(**fault), sim.gates) for _ in range(windows)]
    for _ in range(3):  # back to healthy for the next test
        det.update(sim.window(), sim.gates)
    return verdicts


def test_two_expert_collapse_is_collapse_at_once_with_reason(fitted):
    sim, _ = fitted
    shares = np.full_like(sim.shares, 0.02 / 6)
    shares[:, [2, 5]] = 0.49
    first = _run(fitted, shares=shares)[0]
    assert first.severity == "collapse"
    gate = first.gates[sim.gates[0].name]
    assert gate.checks["load"] == "collapse" and gate.checks["concentration"] == "collapse"
    reason = next(r for r in gate.reasons if r.startswith("experts 2,5 take"))
    taken = float(reason.split(" take ")[1].split("%")[0])
    assert taken > 90
    base = float(reason.split("(baseline ")[1].split("%")[0])
    assert base == pytest.approx(100 * sim.shares[0, [2, 5]].sum(), abs=3)


def test_dead_expert_is_collapse(fitted):
    sim, _ = fitted
    shares = sim.shares.copy()
    shares[:, 4] = 0
    shares /= shares.sum(1, keepdims=True)
    v = _run(fitted, shares=shares)[0]
    gate = v.gates[sim.gates[1].name]
    assert gate.severity == "collapse" and gate.checks["underload"] == "collapse"
    assert any(r.startswith("expert 4 is dead: 0 of") for r in gate.reasons)


def test_logit_saturation_is_collapse(fitted):
    v = _run(fitted, logit_scale=8.0)[0]
    gate = next(iter(v.gates.values()))
    assert gate.checks["logit_std"] == "collapse" and gate.checks["top1_prob"] == "collapse"
    assert any(r.startswith("router-logit std") for r in gate.reasons)


def test_drop_spike_is_collapse_and_nonfinite_logits_too(fitted):
    v = _run(fitted, drop_fraction=0.12)[0]
    gate = next(iter(v.gates.values()))
    assert gate.checks["drop_rate"] == "collapse"
    assert any(r.startswith("drop rate 1") for r in gate.reasons)
    v = _run(fitted, nonfinite=3)[0]
    assert all(g.checks.get("nonfinite") == "collapse" for g in v.gates.values())


def test_would_be_drops_of_a_dropless_gate_are_drift_not_collapse(fitted):
    """capacity_factor= on a dropless model reports drops that never happened: a warning."""
    import dataclasses

    sim, _ = fitted
    dropless = [dataclasses.replace(g, native_capacity=False) for g in sim.gates]
    det = BaselineDetector(dropless, Baseline.from_frame(sim.frame(120)), 100_000, 2)
    until_first_verdict(lambda: det.update(sim.window(), dropless), limit=8)
    verdicts = [det.update(sim.window(drop_fraction=0.12), dropless) for _ in range(4)]
    # a drift, not a collapse: confirmed on the make-up of the windows that show it
    assert [v.note.startswith("waiting to confirm a drift") for v in verdicts] == [True] * 3 + [False]
    assert [v.waiting for v in verdicts] == ["confirming"] * 3 + [""]
    verdict = verdicts[-1]
    gate = verdict.gates[dropless[0].name]
    assert gate.checks["drop_rate"] == "drift"
    assert any(r.startswith("would-be drop rate 1") for r in gate.reasons)
    absolute = AbsoluteDetector(dropless, persistence=1)
    verdict = absolute.update(sim.window(drop_fraction=0.12), dropless)
    assert verdict.gates[dropless[0].name].checks["drop_rate"] == "drift"
    real = AbsoluteDetector(sim.gates, persistence=1).update(sim.window(drop_fraction=0.12), sim.gates)
    assert real.gates[sim.gates[0].name].checks["drop_rate"] == "collapse"


def test_new_traffic_mix_is_drift_not_collapse(fitted):
    sim, _ = fitted
    other = np.random.default_rng(11).dirichlet(np.full(8, 8.0), size=len(sim.gates))
    # 65% of the way to another mix: at 60% the persistence score sits within a few percent of
    # its threshold on this over-dispersed traffic, so which window fires depends on noise
    verdicts = _run(fitted, windows=12, shares=0.35 * sim.shares + 0.65 * other)
    assert any(v.severity == "drift" for v in verdicts), [v.note for v in verdicts]
    assert all(v.severity != "collapse" for v in verdicts)
    # a new drift is reported once the pairs of the windows that show it say their make-up is
    # the baseline's (the first windows of a change into fewer, longer requests look the same):
    # the window that first looked like one, and the three after it, judged together
    first = next(i for i, v in enumerate(verdicts) if v.severity == "drift")
    assert [v.note.startswith("waiting to confirm a drift") for v in verdicts[first - 3:first]] == [True] * 3
    assert "judged together (4 windows" in verdicts[first].note


def test_persistence_needs_consecutive_windows():
    """A change between the persistence threshold and the single-window one fires on the second window."""
    sim = HealthyTraffic(num_gates=1, experts=8, seed=8)
    det = _detector(sim)
    until_first_verdict(lambda: det.update(sim.window(), sim.gates), limit=8)
    h1, hr = det.h1[0, 6], det.hr[0, 6]  # entropy check
    mu, sd = det.params["entropy_mu"][0], det.params["entropy_s"][0]
    w = sim.window()
    tokens = w.sums[0, 0]

    def score(entropy: float) -> float:
        w.sums[0, 1] = entropy * tokens
        return float(scores(det.params, window_features(w, det.experts))[0, 6])

    # the entropy whose two-sided score lies half-way between hr and h1 (the score rises with it)
    target = (h1 + hr) / 2
    x = optimize.brentq(lambda e: score(e) - target, mu, mu + 50 * sd)
    assert hr < score(x) < h1
    first = det.update(w, sim.gates)
    w2 = sim.window()
    w2.sums[0, 1] = x * tokens
    second = det.update(w2, sim.gates)
    assert first.gates[sim.gates[0].name].checks["entropy"] == "ok" and first.note == ""
    # the second fires the persistence rule: a new drift, confirmed on the next windows' make-up
    assert second.note.startswith("waiting to confirm a drift")
    confirming = []
    for _ in range(3):
        w3 = sim.window()
        w3.sums[0, 1] = x * w3.sums[0, 0]
        confirming.append(det.update(w3, sim.gates))
    assert all(v.note.startswith("waiting to confirm") for v in confirming[:-1])
    assert confirming[-1].gates[sim.gates[0].name].checks["entropy"] == "drift"


# -- without a baseline --------------------------------------------------------------------------
def test_absolute_rules_without_baseline():
    sim = HealthyTraffic(num_gates=2, experts=8, seed=9)
    sim.shares[:] = 1 / 8
    det = AbsoluteDetector(sim.gates, persistence=2)
    healthy = [det.update(sim.window(), sim.gates) for _ in range(5)]
    assert all(v.severity == "ok" and not v.has_baseline and "no baseline" in v.note for v in healthy)
    shares = np.full_like(sim.shares, 0.01)
    shares[:, 3] = 0.93
    shares /= shares.sum(1, keepdims=True)
    # top-1 routing: one expert chosen by ~93% of the tokens (over the 80% rule)
    sim.top_k = 1
    first, second = (det.update(sim.window(shares=shares), sim.gates) for _ in range(2))
    assert first.severity == "ok"  # persistence: two windows
    gate = second.gates[sim.gates[0].name]
    assert second.severity == "collapse" and gate.checks["overload"] == "collapse"
    assert any("expert 3 is chosen by 9" in r for r in gate.reasons)
    tiny = [det.update(sim.window(tokens=5, shares=shares), sim.gates) for _ in range(4)]
    assert all(v.severity == "ok" for v in tiny)  # too few tokens to judge


# -- a real model --------------------------------------------------------------------------------
def _traffic(model, gen, batches, batch=4, length=64):
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randint(0, 128, (batch, length), generator=gen))


def test_biased_router_on_real_mixtral_is_collapse_naming_the_experts(one_thread):
    model = tiny_mixtral(seed=3)
    gen = torch.Generator().manual_seed(0)
    with moewatch.attach(model, background=False) as mon:
        for _ in range(30):  # one batch of 256 tokens per window
            _traffic(model, gen, 1)
            mon.flush()
        baseline = mon.baseline()
    assert mon.health().has_baseline is False
    with moewatch.attach(model, baseline=baseline, background=False) as mon:
        for _ in range(4):
            _traffic(model, gen, 1)
            assert mon.flush().severity == "ok", str(mon.health())
        # gate inputs share a mean direction: add it to experts 0 and 1's rows of the gate weight
        gate = model.model.layers[1].mlp.gate
        inputs = []
        handle = gate.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, 64)))
        _traffic(model, gen, 1)
        handle.remove()
        assert mon.flush().severity == "ok"
        mean = torch.cat(inputs).mean(0)
        with torch.no_grad():
            gate.weight[[0, 1]] += 20 * mean / (mean @ mean)
        _traffic(model, gen, 1)
        health = mon.flush()
    assert health.severity == "collapse", str(health)
    verdict = health.gates["model.layers.1.mlp.gate"]
    assert verdict.severity == "collapse"
    assert any("experts 0,1 take" in r for r in verdict.reasons), verdict.reasons
    assert health.gates["model.layers.0.mlp.gate"].severity == "ok"


def test_a_gate_whose_tokens_choose_every_expert_is_judged_by_its_logits_alone(one_thread):
    """top-k = E: every token goes to every expert, so the load is the same in every window and
    says nothing of the routing. Its baseline spread is 0, and the effective number of experts
    (small-sample corrected) still moves with the window's size: healthy traffic was judged
    drift in every run (windows pooled to 160 tokens: 4.01 against the baseline's 4.05). The
    load checks are left out there; a saturated router is still caught by its logits."""
    model = tiny_mixtral(experts=4, top_k=4)
    gen = torch.Generator().manual_seed(0)
    with moewatch.attach(model, background=False, window_tokens=32) as mon:
        for _ in range(16):
            _traffic(model, gen, 1, batch=4, length=8)
            mon.flush()
        baseline = mon.baseline()
    with moewatch.attach(model, baseline=baseline, background=False, window_tokens=32) as mon:
        verdicts = []
        for _ in range(30):  # small windows, judged pooled: the case that alarmed
            _traffic(model, gen, 1, batch=4, length=8)
            verdicts.append(mon.flush().severity)
        assert set(verdicts) == {"ok"}, str(mon.health())
        with moewatch.faults.saturate(model):
            for _ in range(12):
                _traffic(model, gen, 1, batch=4, length=8)
                health = mon.flush()
                if health.severity != "ok":
                    break
    assert health.severity in ("drift", "collapse"), str(health)
    assert any("logit" in r or "top-1" in r or "entropy" in r
               for verdict in health.gates.values() for r in verdict.reasons), str(health)
