"""Alertmanager: detector verdicts become v2 alerts; a real Alertmanager shows and resolves them."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

import moewatch
from moewatch.export.alertmanager import COLLAPSE, DRIFT, AlertmanagerExporter
from moewatch.health import GateHealth, Health

from conftest import tiny_mixtral
from export_helpers import CollapseFault, Endpoint, run_forwards, start_stack, wait_for

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.fixture(scope="module")
def faulty():
    model = tiny_mixtral()
    return model, CollapseFault(model)


def exporter_of(mon) -> AlertmanagerExporter:
    return next(e for e in mon._exporters if isinstance(e, AlertmanagerExporter))


def windows(mon, model, n, seed=0):
    for i in range(n):
        run_forwards(model, steps=1, batch=4, seed=seed + i)  # 64 tokens: enough for the rules
        health = mon.flush()
    return health


def moewatch_alerts(alerts):
    return [a for a in alerts if a["labels"]["alertname"] in (COLLAPSE, DRIFT)]


def test_injected_collapse_fires_on_real_alertmanager_and_resolves(request, faulty):
    model, fault = faulty
    stack = start_stack(request, prometheus=False)
    fault.on = False
    mon = moewatch.attach(model, model_name="tiny-mixtral", rank=2, background=False,
                          alertmanager_url=stack.alertmanager_url)
    request.addfinalizer(mon.detach)
    assert windows(mon, model, 2).severity == "ok"
    fault.on = True
    health = windows(mon, model, 3)
    assert health.severity == "collapse"
    fired = stack.wait_alerts(lambda a: len(moewatch_alerts(a)) == 2, active="true")
    for alert in moewatch_alerts(fired):
        labels, notes = alert["labels"], alert["annotations"]
        assert alert["status"]["state"] == "active"
        assert labels["alertname"] == COLLAPSE
        assert labels["severity"] == "critical"
        assert (labels["model"], labels["rank"]) == ("tiny-mixtral", "2")
        assert labels["layer"] in GATES
        assert notes["runbook_url"] == "docs/runbook.md#moewatchgatecollapse"
        assert labels["layer"] in notes["summary"]
        assert "expert 0" in notes["description"]
    assert sorted(a["labels"]["layer"] for a in moewatch_alerts(fired)) == GATES
    # Remove the fault: healthy windows resolve both alerts (endsAt in the past).
    fault.on = False
    assert windows(mon, model, 3, seed=10).severity == "ok"
    stack.wait_alerts(lambda a: not moewatch_alerts(a))
    assert mon.errors.counts().get("alertmanager", 0) == 0
    assert exporter_of(mon).sent >= 2
    assert exporter_of(mon).active() == []


def test_one_post_per_state_change_and_resolution_with_ends_at(faulty):
    model, fault = faulty
    receiver = Endpoint("ok")
    mon = moewatch.attach(model, model_name="tiny", background=False, alertmanager_url=receiver.url,
                          alert_resend_seconds=60, alert_resolve_windows=2)
    try:
        fault.on = True
        windows(mon, model, 3)
        assert receiver.wait_requests(1)
        first = receiver.json_bodies()[0]
        assert sorted(a["labels"]["layer"] for a in first) == GATES
        windows(mon, model, 8)  # the collapse goes on: nothing new to say before the resend is due
        fault.on = False
        windows(mon, model, 1, seed=20)  # one healthy window: not resolved yet
        assert [a["layer"] for a in exporter_of(mon).active()] == GATES
        windows(mon, model, 1, seed=21)
        assert receiver.wait_requests(2)
        assert receiver.requests == 2, "a persisting collapse must not post again before the resend"
        resolved = receiver.json_bodies()[1]
        assert [a["startsAt"] for a in resolved] == [a["startsAt"] for a in first]
        ends = [a["endsAt"] for a in resolved]
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1))
        assert all(e <= now for e in ends), ends
        assert receiver.paths == ["/api/v2/alerts"] * 2
    finally:
        fault.on = False
        mon.detach()
        receiver.stop()


def test_active_alerts_are_resent_and_drift_is_a_warning(faulty):
    model, _ = faulty
    receiver = Endpoint("ok")
    mon = moewatch.attach(model, model_name="tiny", background=False, alertmanager_url=receiver.url,
                          alert_resend_seconds=0.2, alert_resolve_windows=1)
    exporter = exporter_of(mon)
    try:
        drift = Health(severity="drift", gates={GATES[0]: GateHealth("drift", ["entropy fell to 1.2 nats"])})
        exporter(SimpleNamespace(index=4), drift)
        assert receiver.wait_requests(3)  # the first post, then resends while active
        bodies = receiver.json_bodies()
        for body in bodies[:3]:
            (alert,) = body
            assert alert["labels"]["alertname"] == DRIFT
            assert alert["labels"]["severity"] == "warning"
            assert alert["labels"]["layer"] == GATES[0]
            assert alert["startsAt"] == bodies[0][0]["startsAt"]  # the same alert, not new ones
            assert "entropy fell to 1.2 nats (window 4)" == alert["annotations"]["description"]
        # Escalation: the collapse alert starts at once; the drift alert resolves with its window.
        collapse = Health(severity="collapse", gates={GATES[0]: GateHealth("collapse", ["top share 1.00"])})
        exporter(SimpleNamespace(index=5), collapse)
        assert [a["alertname"] for a in exporter.active()] == [COLLAPSE]
        seen = wait_for(lambda: [b for b in receiver.json_bodies()
                                 if any(a["labels"]["alertname"] == COLLAPSE for a in b)])
        by_name = {a["labels"]["alertname"]: a for a in seen[0]}
        assert by_name[DRIFT]["endsAt"] == by_name[COLLAPSE]["startsAt"]  # resolved as the collapse began
        assert by_name[COLLAPSE]["labels"]["severity"] == "critical"
    finally:
        mon.detach()
        receiver.stop()


def test_alerts_wait_out_an_outage_and_are_delivered_after_it(faulty):
    model, fault = faulty
    receiver = Endpoint("error")  # Alertmanager answering 500
    mon = moewatch.attach(model, model_name="tiny", background=False, alertmanager_url=receiver.url,
                          alert_resend_seconds=60)
    try:
        fault.on = True
        windows(mon, model, 3)
        assert wait_for(lambda: mon.errors.counts().get("alertmanager", 0) >= 1)
        assert receiver.bodies == [] and exporter_of(mon).sent == 0
        receiver.mode = "ok"  # the outage ends: the retry (with backoff) delivers what is pending
        assert wait_for(lambda: receiver.bodies, timeout=120)
        assert sorted(a["labels"]["layer"] for a in receiver.json_bodies()[0]) == GATES
        assert wait_for(lambda: exporter_of(mon).sent == 1)
    finally:
        fault.on = False
        mon.detach()
        receiver.stop()
