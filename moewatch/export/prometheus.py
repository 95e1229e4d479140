"""Prometheus: a custom collector that builds fresh metric families at every scrape.

Nothing is kept in prometheus-client metric objects between scrapes: each ``collect()`` reads the
monitor's latest state (:mod:`moewatch.export.state`) and turns it into families named by
:mod:`moewatch.schema`. Scrapes run on the HTTP server's thread (:mod:`moewatch.export.http`),
never on the model's. Label values are encodable (:mod:`moewatch.export.labels`), and a scrape
that fails is counted, never a silent HTTP 500.
"""
from __future__ import annotations

from typing import Iterator, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric as PromMetric

from ..schema import DEFAULT_EXPERT_SERIES_BUDGET, METRICS, Metric
from .http import MetricsServer
from .rank import process_rank
from .samples import admitted_expert_families, samples
from .state import StateReader


def _family(metric: Metric) -> PromMetric:
    # prometheus-client appends `_total` to counters itself.
    if metric.type == "counter":
        return CounterMetricFamily(metric.base_name, metric.help, labels=list(metric.labels))
    return GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))


class MonitorCollector:
    """A prometheus-client collector for one monitor.

    ``registry.register(MonitorCollector(mon))`` exposes the monitor on any registry you already
    serve; :meth:`moewatch.Monitor.serve_prometheus` does that and starts an HTTP endpoint.
    Per-expert families are exported only while they fit in ``expert_series_budget`` series.
    """

    def __init__(self, monitor, expert_series_budget: Optional[int] = None):
        budget = expert_series_budget
        if budget is None:
            budget = getattr(monitor.options, "expert_series_budget", DEFAULT_EXPERT_SERIES_BUDGET)
        self._reader = StateReader(monitor)
        self._errors = monitor.errors
        self.expert_families = admitted_expert_families([g.num_experts for g in monitor.gates], budget)
        self._metrics = [m for m in METRICS if m.level != "expert" or m.name in self.expert_families]

    def describe(self) -> Iterator[PromMetric]:
        """Empty families, so a registry rejects a second collector with the same names."""
        for metric in self._metrics:
            yield _family(metric)

    def collect(self) -> Iterator[PromMetric]:
        try:
            families = self._families()
        except Exception as error:  # a failed scrape is counted; the next one tries again
            self._errors.record("prometheus", error)
            return
        yield from families

    def _families(self) -> list:
        state = self._reader.read()
        if state is None:  # the monitor is gone
            return []
        values = samples(state, self.expert_families)
        out = []
        for metric in self._metrics:
            family = _family(metric)
            for labels, value in values[metric.name]:
                family.add_metric(list(labels), value)
            out.append(family)
        return out


class PrometheusEndpoint:
    """An HTTP /metrics endpoint serving one registry; stopped by :meth:`close` (on detach)."""

    def __init__(self, registry: CollectorRegistry, collector: MonitorCollector, port: int, addr: str,
                 errors=None):
        self.registry = registry
        self.collector = collector
        self._server = MetricsServer(registry, addr, port, errors=errors)
        self.port: int = self._server.server_port
        self.addr = addr

    def close(self) -> None:
        self._server.close()


def serve(monitor, port: int = 9400, addr: str = "127.0.0.1",
          registry: Optional[CollectorRegistry] = None, local_rank: Optional[int] = None) -> PrometheusEndpoint:
    """Register a :class:`MonitorCollector` (in ``registry`` or a new one) and serve it over HTTP.

    ``port`` is the base port: the process listens on ``port + local rank`` so that every rank
    on a host has its own endpoint (``local_rank``: given by an engine that knows it, else
    ``LOCAL_RANK``); ``port=0`` takes any free port.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer in 0-65535 (0 takes any free port)")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr={addr!r} must be a host address to listen on, such as '127.0.0.1'")
    if local_rank is not None and (isinstance(local_rank, bool) or not isinstance(local_rank, int) or local_rank < 0):
        raise ValueError(f"local_rank={local_rank!r} must be a non-negative integer")
    if port:
        port += process_rank(monitor.options).local_rank if local_rank is None else local_rank
        if port > 65535:
            raise ValueError(f"port {port} (base + local rank) is above 65535: pick a lower base port")
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    collector = MonitorCollector(monitor)
    registry.register(collector)
    try:
        return PrometheusEndpoint(registry, collector, port, addr, errors=monitor.errors)
    except OSError as error:  # in use, no such address, not allowed: name what and where
        registry.unregister(collector)
        raise OSError(error.errno, f"cannot serve Prometheus metrics on {addr}:{port}: {error.strerror or error}; "
                                   "pass another port= (port=0 takes any free one) or an address of this "
                                   "host as addr=") from error
    except Exception:
        registry.unregister(collector)
        raise

