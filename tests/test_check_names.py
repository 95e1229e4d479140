"""One set of detector check names in both modes, and reasons whose percentages say what they
are a share of (assignments or tokens), checked against the window they describe."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from moewatch import schema
from moewatch.baseline import Baseline
from moewatch.detector import AbsoluteDetector, BaselineDetector
from moewatch.detector.nullmodel import CHECKS as CALIBRATED
from moewatch.detector.pooling import joined
from moewatch.windows import gate_row
from tests.alert_rules_helpers import DASHBOARD, rule_test_files
from tests.conftest import until_first_verdict
from tests.detector_sim import HealthyTraffic


def test_schema_lists_every_check_of_both_detectors():
    assert list(schema.CHECKS) == list(CALIBRATED) + ["nonfinite"]
    assert set(schema.ABSOLUTE_CHECKS) == {"overload", "underload", "concentration", "drop_rate", "nonfinite"}


def test_both_modes_report_the_same_names():
    sim = HealthyTraffic(num_gates=2, experts=8, seed=4)
    sim.shares[:] = 1 / 8
    absolute = AbsoluteDetector(sim.gates, persistence=2).update(sim.window(), sim.gates)
    calibrated = BaselineDetector(sim.gates, Baseline.from_frame(sim.frame(40)), 100_000, 2)
    until_first_verdict(lambda: calibrated.update(sim.window(), sim.gates))
    with_baseline = calibrated.update(sim.window(), sim.gates)
    for gate in absolute.gates.values():
        assert list(gate.checks) == list(schema.ABSOLUTE_CHECKS)
    for gate in with_baseline.gates.values():
        assert list(gate.checks) == list(schema.CHECKS)  # nonfinite included while ok


def test_the_same_fault_fires_the_same_check_with_and_without_a_baseline():
    """Top-1 routing with one expert chosen by ~93% of tokens: `overload` in both modes."""
    sim = HealthyTraffic(num_gates=1, experts=8, top_k=1, seed=5)
    sim.shares[:] = 1 / 8
    calibrated = BaselineDetector(sim.gates, Baseline.from_frame(sim.frame(40)), 100_000, 2)
    until_first_verdict(lambda: calibrated.update(sim.window(), sim.gates))
    absolute = AbsoluteDetector(sim.gates, persistence=1)
    shares = np.full_like(sim.shares, 0.01)
    shares[:, 3] = 0.93
    window = sim.window(shares=shares / shares.sum(1, keepdims=True))
    name = sim.gates[0].name
    for verdict in (absolute.update(window, sim.gates), calibrated.update(window, sim.gates)):
        checks = verdict.gates[name].checks
        assert checks["overload"] == "collapse" and checks["concentration"] == "collapse", checks
        assert set(checks) <= set(schema.CHECKS)


def test_alert_rule_tests_and_dashboard_use_only_schema_check_names():
    used = set()
    for path in rule_test_files():
        with open(path) as fh:
            for test in yaml.safe_load(fh)["tests"]:
                for series in test.get("input_series", []):
                    used |= set(re.findall(r'check="([^"]+)"', series["series"]))
    assert used and used <= set(schema.CHECKS), used - set(schema.CHECKS)
    with open(DASHBOARD) as fh:
        text = fh.read()
    named = set(re.findall(r"\(load, ([a-z_0-9, ]+), \.\.\.\)", text))
    for group in named:
        assert {c.strip() for c in group.split(",")} <= set(schema.CHECKS)


# -- words: "of assignments" is a share of assignments, "of tokens" a share of tokens -----------
_PERCENT = re.compile(r"(expert|experts) ([0-9,]+) (?:takes|take|is chosen by) ([0-9.]+)% of (assignments|tokens)"
                      r"(?:, chosen by ([0-9.]+)% of tokens)?")
_AND_TAKES = re.compile(r"expert ([0-9]+) is chosen by [0-9.]+% of tokens \(over [0-9]+%\) and takes ([0-9.]+)% "
                        r"of assignments")


def _check_reason(reason: str, row: dict) -> int:
    """Assert every percentage in ``reason`` against ``row``; returns how many were checked."""
    counts = np.asarray(row["expert_counts"], dtype=float)
    checked = 0
    for _, ids, value, unit, chosen in _PERCENT.findall(reason):
        experts = [int(e) for e in ids.split(",")]
        decimals = len(value.split(".")[1]) if "." in value else 0
        tolerance = 0.5 * 10 ** -decimals + 1e-9
        expected = counts[experts].sum() / (row["assignments"] if unit == "assignments" else row["tokens"])
        assert float(value) == pytest.approx(100 * expected, abs=tolerance), (reason, unit)
        checked += 1
        if chosen:
            assert len(experts) == 1
            assert float(chosen) == pytest.approx(100 * counts[experts[0]] / row["tokens"], abs=0.5), reason
            checked += 1
    for expert, value in _AND_TAKES.findall(reason):
        assert float(value) == pytest.approx(100 * counts[int(expert)] / row["assignments"], abs=0.5), reason
        checked += 1
    return checked


@pytest.mark.parametrize("mode", ["baseline", "absolute"])
def test_reason_percentages_match_the_window(mode):
    """Top-2 routing, so a share of assignments is half a share of tokens: a reason that called
    one the other would be off by a factor of two."""
    sim = HealthyTraffic(num_gates=1, experts=8, top_k=2, seed=7)
    sim.shares[:] = 1 / 8
    baseline = Baseline.from_frame(sim.frame(40))
    checked = 0
    for hot in ([1], [0, 1], [], "starve"):
        # a fresh detector past its first verdict for each: every verdict is of its own window
        if mode == "baseline":
            detector = BaselineDetector(sim.gates, baseline, 100_000, 1)
            until_first_verdict(lambda: detector.update(sim.window(), sim.gates))
        else:
            detector = AbsoluteDetector(sim.gates, persistence=1)
        shares = np.full((1, 8), 1 / 8)
        if hot == "starve":
            shares[0, 6] = 0.004
        else:
            shares[0, hot] = 0.75 if len(hot) == 1 else 0.4  # 1: ~48% of assignments, ~97% of tokens
            shares[0, 7] = 0.0  # a dead expert as well
        shares /= shares.sum(1, keepdims=True)
        window = sim.window(shares=shares)
        verdict = detector.update(window, sim.gates)
        while verdict.waiting == "confirming":  # judged with the windows after it
            more = sim.window(shares=shares)
            verdict = detector.update(more, sim.gates)
            window = joined(window, more)
        row = gate_row(window, 0, sim.gates[0])
        reasons = verdict.gates[sim.gates[0].name].reasons
        assert reasons, (mode, hot)
        for reason in reasons:
            checked += _check_reason(reason, row)
            # the old wording called a share of assignments "of tokens", baseline included
            assert not re.search(r"% of tokens \(baseline [0-9.]+%\)", reason), reason
    assert checked >= 3


def test_dashboard_says_what_a_share_of_assignments_is():
    import json

    with open(DASHBOARD) as fh:
        panels = {p["title"]: p for p in json.load(fh)["panels"]}
    text = panels["Busiest expert share"]["description"]
    assert "Share of a gate's assignments" in text and "1/N is balanced" in text and "k/N is balanced" not in text
