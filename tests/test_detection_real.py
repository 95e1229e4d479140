"""The calibrated detector on the trained router model, with faults injected at one gate.

A baseline of training-distribution traffic; then held-out files (healthy), each fault of
moewatch.faults, and English prose. Small windows (1024 tokens) keep the test fast.
"""
from __future__ import annotations

from typing import List

import pytest
import torch

import moewatch
from moewatch import faults, pretrained
from tests.conftest import until_first_verdict

BATCH = 4  # sequences of 128 bytes per forward pass
FORWARDS = 2  # forward passes per window: 1024 tokens
BASELINE_WINDOWS = 24


def run_windows(model, mon, traffic, windows: int) -> List[moewatch.Health]:
    verdicts = []
    for _ in range(windows):
        for _ in range(FORWARDS):
            with torch.no_grad():
                model(input_ids=next(traffic))
        verdicts.append(mon.flush())
    return verdicts


@pytest.fixture(scope="module")
def model():
    return pretrained.load_router_model()[0]


@pytest.fixture(scope="module")
def clean_probe(model):
    """A sequence and the logits the model computes for it, unwatched (a probe run while watched
    would be routed into the window the fault starts in)."""
    probe = next(pretrained.heldout_batches(1, seed=99))
    with torch.no_grad():
        return probe, model(input_ids=probe).logits


@pytest.fixture(scope="module")
def baseline(model):
    with moewatch.attach(model, background=False) as mon:
        run_windows(model, mon, pretrained.training_batches(BATCH, seed=11), BASELINE_WINDOWS)
        return mon.baseline()


@pytest.fixture
def watch(model, baseline):
    """A fresh monitor (fresh persistence state) with the baseline, on held-out traffic, past
    its first verdict."""
    mon = moewatch.attach(model, baseline=baseline, background=False)
    traffic = pretrained.heldout_batches(BATCH, seed=12)
    until_first_verdict(lambda: run_windows(model, mon, traffic, 1)[0])
    yield mon, traffic
    mon.detach()


def test_healthy_heldout_traffic_stays_ok(model, watch):
    mon, traffic = watch
    verdicts = run_windows(model, mon, traffic, 6)
    assert [h.severity for h in verdicts] == ["ok"] * 6, [str(h) for h in verdicts if h.severity != "ok"]
    assert all(h.has_baseline for h in verdicts)


def test_two_expert_collapse_is_called_collapse_within_two_windows(model, watch):
    mon, traffic = watch
    assert run_windows(model, mon, traffic, 1)[0].severity == "ok"
    gate = mon.gates[1].name
    with faults.two_expert_collapse(model, experts=(0, 1), layers=[1]) as fault:
        assert fault.gates == [gate]
        verdicts = run_windows(model, mon, traffic, 2)
    called = [h.gates[gate].severity for h in verdicts]
    assert "collapse" in called, called
    reasons = " ".join(verdicts[called.index("collapse")].gates[gate].reasons)
    assert "experts 0,1" in reasons, reasons
    last = mon.windows().query("gate == @gate").iloc[-1]
    assert last["expert_share"][:2].sum() > 0.6  # the fault really moved the load


@pytest.mark.parametrize("inject, layer", [
    (lambda model: faults.dead_expert(model, expert=3, layers=[2]), 2),
    (lambda model: faults.saturate(model, 8.0, layers=[3]), 3),
], ids=["dead-expert", "saturation"])
def test_dead_expert_and_saturation_are_flagged_within_three_windows(model, clean_probe, watch, inject, layer):
    mon, traffic = watch
    gate = mon.gates[layer].name
    probe, clean = clean_probe
    with inject(model):
        verdicts = run_windows(model, mon, traffic, 3)
    called = [h.gates[gate].severity for h in verdicts]
    assert any(s != "ok" for s in called), [h.note for h in verdicts]
    with torch.no_grad():  # the fault is gone: the model computes exactly what it did before
        assert torch.equal(model(input_ids=probe).logits, clean)


def test_prose_is_never_called_collapse(model, baseline):
    with moewatch.attach(model, baseline=baseline, background=False) as mon:
        verdicts = run_windows(model, mon, pretrained.prose_batches(BATCH, seed=13), 4)
    assert all(h.severity != "collapse" for h in verdicts), [str(h) for h in verdicts]
