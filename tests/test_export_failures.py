"""A down, hanging or failing Alertmanager / OTLP endpoint never blocks or breaks a forward.

Each case keeps the model serving (forward + window close on the test's thread) while the
endpoint misbehaves, and checks that every forward completed with unchanged outputs and that
the failure was counted in ``mon.errors`` and exported as ``moewatch_internal_errors_total``.
"""
from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

import moewatch
from moewatch.export.prometheus import MonitorCollector

from conftest import tiny_mixtral
from export_helpers import CollapseFault, Endpoint, dead_url, wait_for

COMPONENT = {"alertmanager": "alertmanager", "otlp": "otlp"}


@pytest.fixture(scope="module")
def faulty():
    model = tiny_mixtral()
    return model, CollapseFault(model)


def options_for(exporter: str, url: str) -> dict:
    if exporter == "alertmanager":
        return {"alertmanager_url": url}
    return {"otlp_endpoint": url, "otlp_interval_seconds": 0.2}


@pytest.mark.parametrize("mode", ["down", "error", "hang"])
@pytest.mark.parametrize("exporter", ["alertmanager", "otlp"])
def test_bad_endpoint_never_blocks_a_forward(faulty, exporter, mode):
    model, fault = faulty
    endpoint = None if mode == "down" else Endpoint(mode)
    url = dead_url() if endpoint is None else endpoint.url
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    fault.on = True  # a collapse, so that there are alerts to send
    with torch.no_grad():
        expected = model(ids).logits
    mon = moewatch.attach(model, model_name="tiny", background=False, export_timeout_seconds=1.0,
                          **options_for(exporter, url))
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    forwards = 0

    def serve_once() -> bool:
        nonlocal forwards
        with torch.no_grad():
            out = model(ids).logits
        assert torch.equal(out, expected)
        mon.flush()  # the window listeners (the alert client) run here, on this thread
        forwards += 1
        return mon.errors.counts().get(COMPONENT[exporter], 0) >= 1

    try:
        if mode == "hang":
            # While the endpoint holds a request (it answers nothing for 30 s), forwards go on.
            assert wait_for(lambda: serve_once() or endpoint.requests >= 1, timeout=120)
            held = forwards
            for _ in range(3):
                serve_once()
            assert forwards == held + 3 and endpoint.answered == 0
        assert wait_for(serve_once, timeout=120), f"{exporter} failure was never counted"
        failures = mon.errors.counts()[COMPONENT[exporter]]
        exported = registry.get_sample_value("moewatch_internal_errors_total",
                                             {"model": "tiny", "rank": "0", "component": COMPONENT[exporter]})
        assert exported is not None and exported >= failures >= 1
        assert mon.counts()["model.layers.0.mlp.gate"].sum() == forwards * 64 * 2
    finally:
        fault.on = False
        mon.detach()  # returns although the endpoint may still hold a request
        if endpoint is not None:
            endpoint.stop()


@pytest.mark.parametrize("option", ["alertmanager_url", "otlp_endpoint"])
def test_a_malformed_url_is_refused_at_attach(faulty, option):
    model, _ = faulty
    with pytest.raises(ValueError, match=option):
        moewatch.attach(model, **{option: "127.0.0.1:9093"})
    with moewatch.attach(model, background=False) as mon:  # nothing was left attached
        assert mon.attached
