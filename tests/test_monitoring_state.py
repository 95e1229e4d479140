"""A verdict tells "no data yet" and "monitoring is failing" from "healthy": in the API, the
exported metrics and the dump timeline (the alert rules are tested with promtool)."""
from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry

import moewatch
from moewatch.dump import read_dump
from tests.moe_from_scratch import TinyMoELM
from tests.tiny_models import tiny_mixtral


def _state(registry, monitor, state, layer=None):
    labels = {"model": monitor.model_name, "rank": "0", "state": state}
    if layer is None:
        return registry.get_sample_value("moewatch_monitoring_state", labels)
    return registry.get_sample_value("moewatch_gate_monitoring_state", dict(labels, layer=layer))


def test_no_data_before_the_first_window_then_ok():
    model = tiny_mixtral()
    registry = CollectorRegistry()
    with moewatch.attach(model, background=False) as mon:
        mon.serve_prometheus(port=0, registry=registry)
        health = mon.health()
        assert health.monitoring == "no_data" and not health.healthy
        assert str(health).startswith("moewatch health: NO DATA")
        assert _state(registry, mon, "no_data") == 1 and _state(registry, mon, "ok") == 0
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 16)))
        health = mon.flush()
        assert health.monitoring == "ok" and health.healthy
        assert all(g.monitoring == "ok" for g in health.gates.values())
        assert _state(registry, mon, "ok") == 1 and _state(registry, mon, "no_data") == 0
        assert _state(registry, mon, "ok", "model.layers.0.mlp.gate") == 1


def test_hooks_failing_on_every_call_is_failing_not_ok(tmp_path):
    """gates= naming the MoE blocks instead of their routers: the block's output is the hidden
    state (32 wide), not 8 expert logits, so every hook call fails."""
    torch.manual_seed(0)
    model = TinyMoELM().eval()
    registry = CollectorRegistry()
    mon = moewatch.attach(model, gates=["blocks.0", "blocks.1"], top_k=2, num_experts=8, background=False)
    mon.serve_prometheus(port=0, registry=registry)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 10)))
    mon.flush()  # the calls are reduced (and fail) here at the latest; no window closes
    assert mon.error_counts().get("hook", 0) >= 2
    health = mon.health()  # no window has closed: the failures alone decide
    assert health.window is None
    assert health.monitoring == "failing" and not health.healthy
    assert "hook error" in health.note and str(health).startswith("moewatch health: MONITORING FAILING")
    assert {n: g.monitoring for n, g in health.gates.items()} == {"blocks.0": "failing", "blocks.1": "failing"}
    assert _state(registry, mon, "failing") == 1 and _state(registry, mon, "ok") == 0
    assert _state(registry, mon, "failing", "blocks.1") == 1
    assert mon.flush().monitoring == "failing"
    dump = read_dump(mon.dump(str(tmp_path / "failing.parquet")))
    assert dump.metadata["health"]["monitoring"] == "failing"
    mon.detach()


def test_a_window_with_failures_is_failing_and_the_next_clean_one_ok():
    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        model(ids)
    mon.errors.record("reader", RuntimeError("a reader failure"))  # what the reader thread records
    verdict = mon.flush()
    assert verdict.monitoring == "failing" and "1 reader error in this window" in verdict.note
    with torch.no_grad():
        model(ids)
    assert mon.flush().monitoring == "ok"
    mon.detach()


def test_a_gate_without_tokens_in_a_window_has_no_data():
    """The second MoE block is skipped: its gate sees no token while the first one does."""
    torch.manual_seed(0)
    model = TinyMoELM(layers=2).eval()
    mon = moewatch.attach(model, gates="*.router", top_k=2, background=False)
    x = model.embed(torch.randint(0, 64, (2, 10)))
    with torch.no_grad():
        model.blocks[0](x)
    health = mon.flush()
    assert health.monitoring == "ok"
    assert health.gates["blocks.0.router"].monitoring == "ok"
    assert health.gates["blocks.1.router"].monitoring == "no_data"
    mon.detach()


def test_opentelemetry_exports_the_state_too():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    def states(reader):
        out = {}
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "moewatch_monitoring_state":
                        out.update({p.attributes["state"]: p.value for p in metric.data.data_points})
        return out

    model = tiny_mixtral()
    reader = InMemoryMetricReader()
    with moewatch.attach(model, background=False, meter_provider=MeterProvider(metric_readers=[reader])) as mon:
        assert states(reader) == {"ok": 0, "no_data": 1, "failing": 0}
        with torch.no_grad():
            model(torch.randint(0, 128, (2, 16)))
        mon.flush()
        time.sleep(0.6)  # one read of the monitor serves a collection cycle (0.5 s)
        assert states(reader) == {"ok": 1, "no_data": 0, "failing": 0}


def test_a_fault_in_the_reduction_reaches_the_verdict_not_the_caller():
    """A bug of moewatch's own inside a take (here: counting a forward's rows) is counted as a
    reader error; flush() returns a verdict that says so instead of raising into the caller."""
    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False)
    bank = mon._banks.banks[0]
    count_rows, failures = bank._count_rows, []

    def fails_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("a fault in the reduction")
        return count_rows(*args)

    bank._count_rows = fails_once
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        model(ids)
    verdict = mon.flush()  # raised before
    assert failures and mon.errors.total() == 1
    assert verdict.monitoring == "failing" and "reader error" in verdict.note
    # the fault closed no window: the next one to close carries it, the one after is clean again
    for expected in ("failing", "ok"):
        with torch.no_grad():
            model(ids)
        assert mon.flush().monitoring == expected
    assert mon.errors.total() == 1
    assert len(mon.windows()) == 2 * len(mon.gates)
    mon.detach()
