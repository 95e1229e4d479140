"""OpenTelemetry: the schema's metrics as observable instruments on a MeterProvider.

Totals are observable counters (cumulative values read at collection), window statistics are
observable gauges; names are the Prometheus names without ``_total``, attributes the same labels.
Collection runs on the metric reader's thread (for OTLP, its periodic export thread), never on
the model's. With ``otlp_endpoint=`` moewatch builds its own provider that exports over
OTLP/HTTP and counts failed exports in ``mon.errors`` (component ``otlp``).
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from .. import __version__
from ..schema import DEFAULT_EXPERT_SERIES_BUDGET, METRICS, Metric
from .labels import encodable
from .rank import process_rank
from .samples import Sample, admitted_expert_families, samples
from .state import StateReader

SCOPE = "moewatch"


class _Instruments:
    """One observable instrument per schema metric on one provider, observing every monitor on it.

    OpenTelemetry keeps the first instrument of a name per meter, so several monitors in one
    process (several models, or attach after detach) share these and each adds its own series.
    """

    def __init__(self, provider):
        meter = provider.get_meter(SCOPE, __version__)
        self.provider = provider  # held, so the id() key below stays this provider's
        self.sources: "weakref.WeakSet[OtelExporter]" = weakref.WeakSet()
        self.instruments = []
        for metric in METRICS:
            create = meter.create_observable_counter if metric.type == "counter" else meter.create_observable_gauge
            self.instruments.append(create(metric.base_name, callbacks=[self._callback(metric)],
                                           unit=metric.otel_unit, description=metric.help))

    def _callback(self, metric: Metric) -> Callable[[Any], list]:
        def observe(_options) -> list:
            out: list = []
            for source in list(self.sources):
                out.extend(source.observations(metric))
            return out

        observe.__name__ = f"observe_{metric.base_name}"
        return observe


_INSTRUMENTS: Dict[int, _Instruments] = {}  # id(provider) -> its instruments
_INSTRUMENTS_LOCK = threading.Lock()


class OtelExporter:
    """Adds one monitor's series to the schema's instruments on ``meter_provider`` (or the global one).

    One collection calls every instrument's callback; they share one read of the monitor
    (cached for ``_STALE_SECONDS``) so all instruments describe the same instant.
    """

    _STALE_SECONDS = 0.5

    def __init__(self, monitor, meter_provider=None, own_provider: bool = False):
        self._reader = StateReader(monitor)
        self._errors = monitor.errors
        self._own_provider = own_provider
        budget = getattr(monitor.options, "expert_series_budget", DEFAULT_EXPERT_SERIES_BUDGET)
        self.expert_families = admitted_expert_families([g.num_experts for g in monitor.gates], budget)
        self._provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        self._lock = threading.Lock()
        self._cache: Optional[Dict[str, List[Sample]]] = None
        self._cache_time = 0.0
        with _INSTRUMENTS_LOCK:
            instruments = _INSTRUMENTS.get(id(self._provider))
            if instruments is None:
                instruments = _INSTRUMENTS[id(self._provider)] = _Instruments(self._provider)
            instruments.sources.add(self)
        self._instruments = instruments

    def _samples(self) -> Dict[str, List[Sample]]:
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache_time > self._STALE_SECONDS:
                state = self._reader.read()
                self._cache = samples(state, self.expert_families) if state is not None else {}
                self._cache_time = now
            return self._cache

    def observations(self, metric: Metric) -> list:
        """This monitor's observations of ``metric`` (failures counted, never raised into the SDK)."""
        try:
            rows = self._samples().get(metric.name, [])
            return [Observation(value, dict(zip(metric.labels, labels))) for labels, value in rows]
        except Exception as error:
            self._errors.record("otel", error, where=metric.name)
            return []

    def close(self) -> None:
        """Stop observing this monitor; shut down a provider moewatch built itself (off this thread)."""
        self._instruments.sources.discard(self)
        if self._own_provider and self._provider is not None:
            provider, self._provider = self._provider, None
            with _INSTRUMENTS_LOCK:
                _INSTRUMENTS.pop(id(provider), None)
            threading.Thread(target=_shutdown, args=(provider,), name="moewatch-otel-stop", daemon=True).start()


def _shutdown(provider) -> None:
    try:
        provider.shutdown(timeout_millis=5_000)
    except Exception:
        pass


def otlp_provider(monitor, endpoint: str, interval_seconds: float, timeout_seconds: float):
    """A MeterProvider that exports to ``endpoint`` over OTLP/HTTP, failures counted in mon.errors."""
    # The OTLP exporter is an optional dependency (opentelemetry-exporter-otlp-proto-http).
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    url = endpoint if endpoint.rstrip("/").endswith("/v1/metrics") else endpoint.rstrip("/") + "/v1/metrics"
    inner = OTLPMetricExporter(endpoint=url, timeout=timeout_seconds)
    reader = PeriodicExportingMetricReader(
        CountingExporter(inner, monitor.errors),
        export_interval_millis=interval_seconds * 1000.0,
        export_timeout_millis=timeout_seconds * 1000.0,
    )
    resource = Resource.create({"service.name": "moewatch", "moewatch.model": encodable(str(monitor.model_name)),
                                "moewatch.rank": process_rank(monitor.options).rank})
    # No exit hook: a final export to a hanging endpoint must not hold up the process's exit.
    return MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)


class CountingExporter(MetricExporter):
    """Wraps a metric exporter: every failed or raising export is counted, never raised."""

    def __init__(self, inner: MetricExporter, errors):
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner, self.errors = inner, errors

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as error:
            self.errors.record("otlp", error)
            return MetricExportResult.FAILURE
        if result != MetricExportResult.SUCCESS:
            self.errors.record("otlp", RuntimeError("OTLP export failed (endpoint down, slow or refusing)"))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
