"""OpenTelemetry: instruments read back with InMemoryMetricReader, and a real OTLP/HTTP export."""
from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import moewatch

from conftest import tiny_mixtral
from export_helpers import Endpoint, run_forwards, wait_for

GATE0 = "model.layers.0.mlp.gate"


@pytest.fixture(scope="module")
def model():
    return tiny_mixtral()


def points(metrics_data, name):
    """{attributes as a sorted tuple: value} of the SDK's in-memory data for ``name``."""
    out = {}
    for resource in metrics_data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        out[tuple(sorted(p.attributes.items()))] = p.value
    return out


def expert_counts(found, gate):
    by_expert = {dict(k)["expert"]: v for k, v in found.items() if dict(k)["layer"] == gate}
    return [by_expert.get(str(e)) for e in range(len(by_expert))]


def test_in_memory_reader_sees_the_same_values_as_the_monitor(model):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with moewatch.attach(model, model_name="tiny", background=False, meter_provider=provider) as mon:
        run_forwards(model, steps=2)
        mon.flush()
        run_forwards(model, steps=1, seed=3)
        mon.flush()
        data = reader.get_metrics_data()
        counts = mon.counts()
        frame = mon.windows()
    for gate, per_expert in counts.items():
        assert expert_counts(points(data, "moewatch_expert_assignments"), gate) == per_expert.tolist()
        last = frame[frame.gate == gate].iloc[-1]
        key = (("layer", gate), ("model", "tiny"), ("rank", "0"))
        assert points(data, "moewatch_gate_effective_experts")[key] == pytest.approx(last.effective_experts)
        assert points(data, "moewatch_gate_tokens")[key] == frame[frame.gate == gate].tokens.sum()
        assert points(data, "moewatch_gate_severity")[key] == 0
    assert points(data, "moewatch_windows")[(("model", "tiny"), ("rank", "0"))] == 2
    # Totals are counters (monotonic sums), window statistics gauges.
    kinds = {m.name: type(m.data).__name__ for r in data.resource_metrics for s in r.scope_metrics
             for m in s.metrics}
    assert kinds["moewatch_expert_assignments"] == "Sum"
    assert kinds["moewatch_gate_top_share_ratio"] == "Gauge"
    provider.shutdown()


def test_two_monitors_share_one_provider(model):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    other = tiny_mixtral(seed=1)
    with moewatch.attach(model, model_name="a", background=False, meter_provider=provider) as first, \
            moewatch.attach(other, model_name="b", background=False, meter_provider=provider) as second:
        run_forwards(model, steps=1)
        run_forwards(other, steps=2)
        first.flush()
        second.flush()
        tokens = points(reader.get_metrics_data(), "moewatch_gate_tokens")
    assert tokens[(("layer", GATE0), ("model", "a"), ("rank", "0"))] == 32
    assert tokens[(("layer", GATE0), ("model", "b"), ("rank", "0"))] == 64
    # A detached monitor's series stop; the other's go on.
    with moewatch.attach(other, model_name="b", background=False, meter_provider=provider) as third:
        run_forwards(other, steps=1)
        third.flush()
        tokens = points(reader.get_metrics_data(), "moewatch_gate_tokens")
    assert {dict(k)["model"] for k in tokens} == {"b"}
    provider.shutdown()


def decode(body: bytes) -> dict:
    """{(metric name, layer, expert): value} of one OTLP/HTTP protobuf request."""
    request = ExportMetricsServiceRequest()
    request.ParseFromString(body)
    out = {}
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                data = metric.sum if metric.HasField("sum") else metric.gauge
                for p in data.data_points:
                    attrs = {a.key: a.value.string_value for a in p.attributes}
                    value = p.as_int if p.HasField("as_int") else p.as_double
                    out[(metric.name, attrs.get("layer"), attrs.get("expert"))] = value
    return out


def test_otlp_http_export_reaches_a_receiver_that_decodes_it(model):
    receiver = Endpoint("ok")
    try:
        mon = moewatch.attach(model, model_name="tiny", background=False, otlp_endpoint=receiver.url,
                              otlp_interval_seconds=0.3)
        try:
            run_forwards(model, steps=2)
            mon.flush()
            counts = mon.counts()

            def arrived():
                for body in reversed(receiver.bodies):
                    got = decode(body)
                    if all(got.get(("moewatch_expert_assignments", gate, str(e))) == c
                           for gate, per in counts.items() for e, c in enumerate(per)):
                        return got
                return None

            got = wait_for(arrived, timeout=60)
        finally:
            mon.detach()
    finally:
        receiver.stop()
    assert got, f"no OTLP request carried the counts; {receiver.requests} request(s) arrived"
    assert set(receiver.paths) == {"/v1/metrics"}
    assert got[("moewatch_gate_tokens", GATE0, None)] == 64
    assert mon.errors.counts().get("otlp", 0) == 0
