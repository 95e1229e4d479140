"""Exporters: where a monitor's windows and verdicts go (Prometheus, OpenTelemetry, Alertmanager).

Every exporter runs off the model's thread and reads the monitor through
:mod:`moewatch.export.state`; metric names come from :mod:`moewatch.schema`. Each object returned
by :func:`start_exporters` (and each Prometheus endpoint) has ``close()``, called on detach.
"""
from __future__ import annotations

from typing import List

from .rank import ProcessRank, process_rank

__all__ = ["ProcessRank", "process_rank", "start_exporters"]


def start_exporters(monitor) -> List[object]:
    """Start the exporters the monitor's options ask for."""
    options = monitor.options
    started: List[object] = []
    provider = options.meter_provider
    own = False
    if provider is None and getattr(options, "otlp_endpoint", None):
        from .otel import otlp_provider

        provider = otlp_provider(monitor, options.otlp_endpoint, options.otlp_interval_seconds,
                                 options.export_timeout_seconds)
        own = True
    from .otel import OtelExporter  # on the global provider when none is given (a no-op until one is set)

    started.append(OtelExporter(monitor, provider, own_provider=own))
    if options.alertmanager_url:
        from .alertmanager import AlertmanagerExporter

        alerts = AlertmanagerExporter(monitor, options.alertmanager_url,
                                      resend_seconds=options.alert_resend_seconds,
                                      timeout_seconds=options.export_timeout_seconds,
                                      resolve_windows=options.alert_resolve_windows,
                                      runbook_url=options.runbook_url)
        monitor.add_listener(alerts)
        started.append(alerts)
    return started
