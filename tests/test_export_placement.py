"""Expert parallelism under expert_placement=: the per-window balance exported to Prometheus and
OpenTelemetry equals what the monitor computes, with per-rank (not per-pair) series; bad option
values are clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

import moewatch
from moewatch.export.prometheus import MonitorCollector
from moewatch.placement import PlacementError

from conftest import padded_batch, tiny_mixtral

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.fixture(scope="module")
def model():
    return tiny_mixtral()


def _run(model, mon, windows=2):
    ids, mask = padded_batch(seed=3)
    with torch.no_grad():
        for _ in range(windows):
            model(ids, attention_mask=mask)
            mon.flush()


def test_prometheus_and_otel_export_the_window_balance(model):
    reader = InMemoryMetricReader()
    mon = moewatch.attach(model, background=False, model_name="ep", rank=1, expert_placement="contiguous:4",
                          meter_provider=MeterProvider(metric_readers=[reader]))
    _run(model, mon)
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    frame = mon.expert_parallel()
    latest = frame[frame["window"] == frame["window"].max()].set_index("gate")
    data = reader.get_metrics_data()
    otel = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                otel[m.name] = {tuple(sorted(p.attributes.items())): p.value for p in m.data.data_points}
    for gate in GATES:
        labels = {"model": "ep", "rank": "1", "layer": gate}
        assert registry.get_sample_value("moewatch_gate_ep_ranks", labels) == 4
        shares = [registry.get_sample_value("moewatch_gate_ep_rank_load_share_ratio", {**labels, "ep_rank": str(r)})
                  for r in range(4)]
        np.testing.assert_allclose(shares, latest.loc[gate, "ep_rank_share"])
        assert np.isclose(sum(shares), 1.0)
        imbalance = registry.get_sample_value("moewatch_gate_ep_load_imbalance_ratio", labels)
        assert imbalance == pytest.approx(latest.loc[gate, "ep_load_imbalance"]) and imbalance == pytest.approx(
            4 * max(shares))
        per_token = registry.get_sample_value("moewatch_gate_alltoall_sends_per_token", labels)
        assert per_token == pytest.approx(latest.loc[gate, "alltoall_sends_per_token"]) and 0 < per_token <= 2
        total = registry.get_sample_value("moewatch_gate_alltoall_sends_total", labels)
        assert total == frame[frame["gate"] == gate]["alltoall_sends"].sum()
        key = tuple(sorted({"model": "ep", "rank": "1", "layer": gate}.items()))
        assert otel["moewatch_gate_alltoall_sends"][key] == total
        assert otel["moewatch_gate_ep_load_imbalance_ratio"][key] == pytest.approx(imbalance)
    # bounded: R series per gate, no per-pair series
    per_rank = [s for f in registry.collect() for s in f.samples if "ep_rank" in s.labels]
    assert len(per_rank) == 4 * len(GATES)
    mon.detach()


def test_without_a_placement_no_series(model):
    mon = moewatch.attach(model, background=False, model_name="none")
    _run(model, mon, windows=1)
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    names = {s.name for f in registry.collect() for s in f.samples}
    assert not {n for n in names if "ep_" in n or "alltoall" in n}
    assert mon.expert_parallel().empty
    mon.detach()


def test_home_rank_unknown_counts_every_send(model, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    frames = {}
    for rank in (None, 0):
        with moewatch.attach(model, background=False, expert_placement="contiguous:2", rank=rank) as mon:
            _run(model, mon, windows=1)
            frames[rank] = mon.expert_parallel().set_index("gate")
    # every token reaches 1 or 2 ranks; with home rank 0 known, the copies to rank 0 are local
    for gate in GATES:
        assert frames[None].loc[gate, "alltoall_sends_per_token"] >= 1.0
        assert frames[0].loc[gate, "alltoall_sends"] < frames[None].loc[gate, "alltoall_sends"]


@pytest.mark.parametrize("value, message", [
    ("contiguous:0", "contiguous:R"),
    ("contiguous:x", "contiguous:R"),
    ("contiguous:16", "fewer than 16 ranks"),
    ([0, 1, 2], "3 ranks, but gate"),
    ([0, 1, -1, 0, 1, 0, 1, 0], "non-negative"),
    (3.5, "must be 'contiguous:R'"),
    ("/nonexistent/placement.json", "does not exist"),
])
def test_bad_placement_values_are_clear_errors(model, value, message):
    with pytest.raises(PlacementError, match=message):
        moewatch.attach(model, expert_placement=value)
    assert issubclass(PlacementError, ValueError)


def test_placement_file_is_read_and_checked(model, tmp_path):
    good = {"ranks": 2, "gates": {g: [0, 1, 0, 1, 0, 1, 0, 1] for g in GATES}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    with moewatch.attach(model, background=False, expert_placement=str(tmp_path / "good.json")) as mon:
        assert mon.placement.num_ranks == 2 and mon.placement.ranks[GATES[1]].tolist() == good["gates"][GATES[1]]
    for name, doc, message in [
        ("missing.json", {"ranks": 2, "gates": {GATES[0]: [0] * 8}}, "no placement for gate"),
        ("rank.json", {"ranks": 2, "gates": {g: [0, 1, 2, 0, 1, 0, 1, 0] for g in GATES}}, "on rank 2"),
        ("shape.json", [1, 2], "must hold"),
    ]:
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(PlacementError, match=message):
            moewatch.attach(model, expert_placement=tmp_path / name)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(PlacementError, match="not readable JSON"):
        moewatch.attach(model, expert_placement=str(tmp_path / "broken.json"))
