"""Alertmanager: detector verdicts become alerts posted to the v2 API (``/api/v2/alerts``).

Per gate there is at most one alert per name: ``MoewatchGateCollapse`` (severity ``critical``,
it pages) and ``MoewatchGateDrift`` (``warning``). An alert starts in the first window whose
verdict reaches its severity and resolves (``endsAt`` = now) after ``alert_resolve_windows``
consecutive windows below it. While active it is re-sent every ``alert_resend_seconds`` with
``endsAt`` a few resend periods ahead, so Alertmanager resolves it by itself if this process dies.

The window listener only updates a table of alerts (bounded: one row per gate and alert name)
and wakes the sender thread; the sender posts the whole table in one request when something
changed or a resend is due. A down, slow or failing Alertmanager delays only that thread:
requests time out, retries back off exponentially, and failures are counted in ``mon.errors``.
Only a 2xx answer counts as delivered; redirects are not followed (a POST would become a GET).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

from ..health import Health
from ..windows import Window
from .labels import encodable
from .rank import process_rank

COLLAPSE = "MoewatchGateCollapse"
DRIFT = "MoewatchGateDrift"
# verdict severity -> (alert name, alert severity label)
ALERTS: Dict[str, Tuple[str, str]] = {"collapse": (COLLAPSE, "critical"), "drift": (DRIFT, "warning")}
_MAX_BACKOFF_SECONDS = 60.0


class AlertmanagerError(RuntimeError):
    """The alerts API did not accept a batch (a redirect, or any status but 2xx)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise AlertmanagerError(f"{req.full_url} answered HTTP {code}, a redirect to {newurl}: not followed "
                                "for a POST (point alertmanager_url at the final address)")


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def alerts_endpoint(url: str) -> str:
    """``http://host:9093`` -> ``http://host:9093/api/v2/alerts`` (a full API URL is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/api/v2/alerts") else url + "/api/v2/alerts"


@dataclass
class Alert:
    labels: Dict[str, str]
    annotations: Dict[str, str]
    starts_at: float
    ends_at: Optional[float] = None  # set when resolved
    calm_windows: int = 0  # consecutive windows below this alert's severity
    delivered: bool = False  # Alertmanager has this version (start or resolution)

    def payload(self, now: float, hold_seconds: float) -> dict:
        ends = self.ends_at if self.ends_at is not None else now + hold_seconds
        return {"labels": self.labels, "annotations": self.annotations,
                "startsAt": _iso(self.starts_at), "endsAt": _iso(ends)}


@dataclass
class _Table:
    """The alerts of one monitor, keyed by (gate, alert name)."""

    alerts: Dict[Tuple[str, str], Alert] = field(default_factory=dict)
    changed: bool = False


class AlertmanagerExporter:
    """A window listener that keeps Alertmanager in step with the detector's verdicts."""

    def __init__(self, monitor, url: str, resend_seconds: float = 30.0, timeout_seconds: float = 5.0,
                 resolve_windows: int = 2, runbook_url: str = "docs/runbook.md"):
        self.url = alerts_endpoint(url)
        self.resend_seconds = float(min(resend_seconds, 60.0))  # Alertmanager expects <= 1 min
        self.timeout_seconds = float(timeout_seconds)
        self.resolve_windows = max(1, int(resolve_windows))
        self.runbook_url = runbook_url
        self._monitor = weakref.ref(monitor)
        self._errors = monitor.errors
        self._base_labels = {"model": encodable(str(monitor.model_name)),
                             "rank": str(process_rank(monitor.options).rank)}
        self._table = _Table()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.sent = 0  # batches Alertmanager accepted (moewatch_alerts_sent_total)
        self._thread = threading.Thread(target=self._run, name="moewatch-alertmanager", daemon=True)
        self._thread.start()

    # -- the listener: runs after each window, never does I/O --------------------------------
    def __call__(self, window: Window, health: Health) -> None:
        now = time.time()
        monitor = self._monitor()
        gate_names = [g.name for g in monitor.gates] if monitor is not None else list(health.gates)
        with self._lock:
            for gate in gate_names:
                verdict = health.gates.get(gate)
                severity = verdict.severity if verdict is not None else "ok"
                reasons = list(verdict.reasons) if verdict is not None else []
                self._update_gate(gate, severity, reasons, window.index, now)
            changed = self._table.changed
        if changed:
            self._wake.set()

    def _update_gate(self, gate: str, severity: str, reasons: List[str], window: int, now: float) -> None:
        firing = ALERTS.get(severity)
        for (name, alertname), alert in list(self._table.alerts.items()):
            if name != gate or alert.ends_at is not None:
                continue
            if firing is not None and firing[0] == alertname:
                alert.calm_windows = 0
                alert.annotations["description"] = self._description(reasons, window)
                continue
            alert.calm_windows += 1
            if alert.calm_windows >= self.resolve_windows:
                alert.ends_at, alert.delivered = now, False
                self._table.changed = True
        if firing is None:
            return
        key = (gate, firing[0])
        current = self._table.alerts.get(key)
        if current is None or current.ends_at is not None:
            self._table.alerts[key] = self._new_alert(gate, severity, reasons, window, now)
            self._table.changed = True

    def _new_alert(self, gate: str, severity: str, reasons: List[str], window: int, now: float) -> Alert:
        alertname, level = ALERTS[severity]
        labels = {"alertname": alertname, "severity": level, **self._base_labels, "layer": encodable(gate)}
        what = "Router collapse" if severity == "collapse" else "Routing drift"
        annotations = {
            "summary": f"{what} at gate {gate} of {labels['model']} (rank {labels['rank']})",
            "description": self._description(reasons, window),
            "runbook_url": f"{self.runbook_url}#{alertname.lower()}",
        }
        return Alert(labels=labels, annotations=annotations, starts_at=now)

    @staticmethod
    def _description(reasons: List[str], window: int) -> str:
        because = "; ".join(reasons) if reasons else "the detector flagged this gate"
        return f"{because} (window {window})"

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        last_sent = 0.0
        while not self._stop.is_set():
            if backoff:
                # After a failure wait out the backoff (only close() interrupts it).
                self._stop.wait(backoff)
            else:
                due = max(0.0, last_sent + self.resend_seconds - time.time())
                self._wake.wait(due)
            if self._stop.is_set() or self._monitor() is None:
                return  # closed, or the monitor was dropped without detach(): its alerts expire by endsAt
            self._wake.clear()
            batch = self._batch()
            if not batch:
                backoff = 0.0
                last_sent = time.time()
                continue
            try:
                self._post(batch)
            except Exception as error:
                self._errors.record("alertmanager", error, where=self.url)
                backoff = min(_MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
                continue
            backoff = 0.0
            last_sent = time.time()
            self.sent += 1
            self._delivered(batch)

    def _batch(self) -> List[Tuple[Tuple[str, str], dict]]:
        """Every active alert and every resolution not yet delivered, as API payloads."""
        now = time.time()
        hold = 4 * self.resend_seconds
        with self._lock:
            self._table.changed = False
            return [(key, alert.payload(now, hold)) for key, alert in self._table.alerts.items()
                    if alert.ends_at is None or not alert.delivered]

    def _delivered(self, batch) -> None:
        with self._lock:
            for key, payload in batch:
                alert = self._table.alerts.get(key)
                if alert is None:
                    continue
                sent_resolution = alert.ends_at is not None and payload["endsAt"] == _iso(alert.ends_at)
                if alert.ends_at is None:
                    alert.delivered = True
                elif sent_resolution:
                    del self._table.alerts[key]  # resolved and told: forget it

    def _post(self, batch) -> None:
        body = json.dumps([payload for _, payload in batch]).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        # Redirects are not followed: urllib turns a POST into a GET on 301/302/303, and
        # Alertmanager answers a GET of /api/v2/alerts with 200, so the alerts would be lost
        # while counted as sent. A redirect is an error naming where it pointed.
        with _NO_REDIRECTS.open(request, timeout=self.timeout_seconds) as response:
            response.read(1 << 16)  # Alertmanager answers with a few bytes; never read without bound
            if not 200 <= response.status < 300:  # anything but 2xx is not delivered
                raise AlertmanagerError(f"{self.url} answered HTTP {response.status}; alerts not delivered")

    # -- introspection and shutdown ----------------------------------------------------------
    def active(self) -> List[Dict[str, str]]:
        """Labels of the alerts this process holds as firing."""
        with self._lock:
            return [dict(a.labels) for a in self._table.alerts.values() if a.ends_at is None]

    def close(self) -> None:
        """Stop the sender; a request in flight is abandoned to its timeout (daemon thread)."""
        self._stop.set()
        self._wake.set()
