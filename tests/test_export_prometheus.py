"""The Prometheus collector, read back with prometheus-client (no server needed)."""
from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import moewatch
from moewatch import schema
from moewatch.export.prometheus import MonitorCollector

from conftest import tiny_mixtral
from export_helpers import CollapseFault, free_port, run_forwards

GATE0 = "model.layers.0.mlp.gate"


@pytest.fixture
def monitored():
    model = tiny_mixtral()
    fault = CollapseFault(model)
    mon = moewatch.attach(model, model_name="tiny", background=False, capacity_factor=1.0, rank=3)
    yield model, mon, fault
    mon.detach()


def value(registry, name, **labels):
    return registry.get_sample_value(name, {"model": "tiny", "rank": "3", **labels})


def test_collector_values_equal_counts_and_windows(monitored):
    model, mon, _ = monitored
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    run_forwards(model, steps=3)
    mon.flush()
    run_forwards(model, steps=1, seed=5)
    mon.flush()
    counts, dropped = mon.counts(), mon.dropped()
    frame = mon.windows()
    assert value(registry, "moewatch_windows_total") == 2
    assert value(registry, "moewatch_up") == 1
    for gate, per_expert in counts.items():
        got = [value(registry, "moewatch_expert_assignments_total", layer=gate, expert=str(e))
               for e in range(len(per_expert))]
        assert got == per_expert.tolist()
        assert value(registry, "moewatch_gate_assignments_total", layer=gate) == per_expert.sum()
        assert value(registry, "moewatch_gate_dropped_assignments_total", layer=gate) == dropped[gate]
        last = frame[frame.gate == gate].iloc[-1]
        assert value(registry, "moewatch_gate_tokens_total", layer=gate) == frame[frame.gate == gate].tokens.sum()
        assert value(registry, "moewatch_gate_window_tokens", layer=gate) == last.tokens
        assert value(registry, "moewatch_gate_effective_experts", layer=gate) == pytest.approx(last.effective_experts)
        assert value(registry, "moewatch_gate_top_share_ratio", layer=gate) == pytest.approx(last.top_share)
        assert value(registry, "moewatch_gate_logit_std", layer=gate) == pytest.approx(last.logit_std)
        assert value(registry, "moewatch_gate_top1_probability", layer=gate) == pytest.approx(last.top1_prob_mean)
        assert value(registry, "moewatch_gate_dead_experts", layer=gate) == last.dead_experts
        assert value(registry, "moewatch_gate_experts", layer=gate) == 8
        shares = [value(registry, "moewatch_expert_load_share_ratio", layer=gate, expert=str(e)) for e in range(8)]
        assert shares == pytest.approx(list(last.expert_share))
        assert sum(shares) == pytest.approx(1.0)
    assert value(registry, "moewatch_last_window_timestamp_seconds") == pytest.approx(frame.t_end.max())
    # Without a baseline there is no ratio to it.
    assert value(registry, "moewatch_gate_logit_std_baseline_ratio", layer=GATE0) is None
    assert value(registry, "moewatch_baseline_loaded") == 0


def test_every_sample_is_in_the_schema(monitored):
    model, mon, _ = monitored
    port = mon.serve_prometheus(port=0)
    run_forwards(model)
    mon.flush()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        known = schema.BY_NAME.get(family.name) or schema.BY_NAME.get(family.name + "_total")
        assert known is not None, f"{family.name} is not in moewatch.schema"
        for sample in family.samples:
            assert set(sample.labels) == set(known.labels), (sample.name, sample.labels)
            assert not math.isnan(sample.value), sample
    exported = {s.name for f in families.values() for s in f.samples}
    assert "moewatch_expert_assignments_total" in exported
    assert "moewatch_gate_check_severity" in exported


def test_health_severity_per_check_follows_the_detector(monitored):
    model, mon, fault = monitored
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    run_forwards(model)
    mon.flush()
    assert value(registry, "moewatch_gate_severity", layer=GATE0) == 0
    fault.on = True
    for _ in range(3):  # the detector requires persistence
        run_forwards(model)
        health = mon.flush()
    assert health.gates[GATE0].severity == "collapse"
    assert value(registry, "moewatch_gate_severity", layer=GATE0) == 2
    for check, severity in health.gates[GATE0].checks.items():
        assert value(registry, "moewatch_gate_check_severity", layer=GATE0, check=check) == \
            schema.SEVERITY_VALUE[severity]
    assert value(registry, "moewatch_gate_top_share_ratio", layer=GATE0) > 0.49


def test_series_budget_drops_per_expert_families_but_keeps_gate_summaries():
    model = tiny_mixtral()
    with moewatch.attach(model, model_name="tiny", background=False, rank=3, expert_series_budget=16) as mon:
        registry = CollectorRegistry()
        registry.register(MonitorCollector(mon))
        run_forwards(model)
        mon.flush()
        assert value(registry, "moewatch_expert_assignments_total", layer=GATE0, expert="0") is not None
        assert value(registry, "moewatch_expert_load_share_ratio", layer=GATE0, expert="0") is None
        assert value(registry, "moewatch_gate_effective_experts", layer=GATE0) is not None
    with moewatch.attach(model, model_name="tiny", background=False, rank=3, expert_series_budget=8) as mon:
        registry = CollectorRegistry()
        registry.register(MonitorCollector(mon))
        run_forwards(model)
        mon.flush()
        assert value(registry, "moewatch_expert_assignments_total", layer=GATE0, expert="0") is None
        assert value(registry, "moewatch_expert_series_enabled") == 0
        assert value(registry, "moewatch_gate_assignments_total", layer=GATE0) == mon.counts()[GATE0].sum()


def test_serve_prometheus_with_a_callers_registry_and_local_rank_port(monkeypatch):
    model = tiny_mixtral()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "5")
    registry = CollectorRegistry()
    base = free_port() - 1  # base + LOCAL_RANK is a port just seen free
    with moewatch.attach(model, model_name="tiny", background=False) as mon:
        try:
            port = mon.serve_prometheus(port=base, registry=registry)
        except OSError:
            pytest.skip("the probed port was taken in between")
        assert port == base + 1
        run_forwards(model)
        mon.flush()
        counts = mon.counts()[GATE0]
        labels = {"model": "tiny", "rank": "5", "layer": GATE0, "expert": "2"}
        assert registry.get_sample_value("moewatch_expert_assignments_total", labels) == counts[2]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert f'moewatch_expert_assignments_total{{expert="2",layer="{GATE0}",model="tiny",rank="5"}} ' \
               f'{float(counts[2])}' in text
        with pytest.raises(ValueError):  # a second collector with the same names is refused
            registry.register(MonitorCollector(mon))
    # After detach the monitor says so; its endpoint is stopped.
    assert registry.get_sample_value("moewatch_up", {"model": "tiny", "rank": "5"}) == 0


def test_internal_errors_are_exported(monitored):
    model, mon, _ = monitored
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))

    def broken(window, health):
        raise RuntimeError("boom")

    mon.add_listener(broken)
    run_forwards(model)
    mon.flush()
    run_forwards(model)
    mon.flush()
    assert value(registry, "moewatch_internal_errors_total", component="listener") == 2
    assert np.array_equal(mon.counts()[GATE0],
                          [value(registry, "moewatch_expert_assignments_total", layer=GATE0, expert=str(e))
                           for e in range(8)])


def test_logit_std_ratio_to_the_baseline():
    model = tiny_mixtral()
    with moewatch.attach(model, model_name="tiny", background=False, rank=3) as recorder:
        for i in range(8):
            run_forwards(model, steps=1, batch=4, seed=i)
            recorder.flush()
        baseline = recorder.baseline()
        typical = {g: float(np.median(baseline.gates[g].series["logit_std"])) for g in baseline.gates}
    with moewatch.attach(model, baseline, model_name="tiny", background=False, rank=3) as mon:
        registry = CollectorRegistry()
        registry.register(MonitorCollector(mon))
        run_forwards(model, steps=1, batch=4, seed=100)
        mon.flush()
        frame = mon.windows()
        assert value(registry, "moewatch_baseline_loaded") == 1
        for gate, std in typical.items():
            now = frame[frame.gate == gate].iloc[-1].logit_std
            assert value(registry, "moewatch_gate_logit_std_baseline_ratio", layer=gate) == pytest.approx(now / std)
