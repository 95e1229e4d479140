"""``attach`` options: defaults and validation with messages that say what to do."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union
from urllib.parse import urlsplit

from .routing import SCORINGS


@dataclass
class Options:
    gates: Union[None, str, Sequence[str]] = None  # pattern(s) over model.named_modules() names
    top_k: Optional[int] = None  # for gates= modules that are not known router classes
    scoring: str = "softmax"  # "softmax" or "sigmoid", for gates= modules
    num_experts: Optional[int] = None  # for gates= modules whose width cannot be read
    capacity_factor: Optional[float] = None  # report would-be drops of dropless gates
    window_tokens: int = 8192  # a window closes after this many tokens ...
    window_seconds: float = 10.0  # ... or this many seconds, whichever comes first
    ring_windows: int = 1024  # windows kept on the host (memory stays bounded)
    sample_decisions: float = 0.0  # fraction of tokens whose decisions are kept for dumps
    alertmanager_url: Optional[str] = None
    meter_provider: Any = None  # an OpenTelemetry MeterProvider
    dump_dir: Optional[str] = None  # automatic dumps: first collapse of a gate, and shutdown
    dump_max_bytes: int = 256 * 2**20  # dump_dir is kept under this total (oldest removed first)
    decision_slots: int = 65536  # sampled decisions kept in the device ring (oldest overwritten)
    model_name: Optional[str] = None  # the `model` label
    # Exporters (moewatch.export).
    rank: Optional[int] = None  # the `rank` label; default: torch.distributed, else RANK / LOCAL_RANK
    expert_series_budget: int = 10_000  # per-expert series allowed, all per-expert families together
    otlp_endpoint: Optional[str] = None  # e.g. http://127.0.0.1:4318: export over OTLP/HTTP
    otlp_interval_seconds: float = 10.0
    export_timeout_seconds: float = 5.0  # per request to Alertmanager / the OTLP endpoint
    alert_resend_seconds: float = 30.0  # active alerts are re-sent this often (at most 60)
    alert_resolve_windows: int = 2  # healthy windows before an alert resolves
    runbook_url: str = "docs/runbook.md"  # alerts link to <runbook_url>#<alertname>
    background: bool = True  # a reader thread closes windows; False: only flush() does
    backend: str = "auto"  # hot path: "auto" (staged on CPU, fused on other devices), "staged", "device"
    # Detector (moewatch.detector).
    ert_windows: float = 100_000  # expected windows between false alarms, all gates together
    persistence: int = 2  # a moderate change must show in this many consecutive windows
    # Expert placement (moewatch.placement): "contiguous:R", a list of ranks, or a placement file.
    expert_placement: Any = None

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"moewatch.attach got unknown option(s) {unknown}; known options: {sorted(known)}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        def positive(name: str, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number")

        positive("window_tokens", self.window_tokens, int)
        if self.backend not in ("auto", "staged", "device"):
            raise ValueError(f"backend={self.backend!r} must be 'auto', 'staged' or 'device'")
        positive("window_seconds", self.window_seconds)
        positive("ring_windows", self.ring_windows, int)
        positive("persistence", self.persistence, int)
        if isinstance(self.ert_windows, bool) or not isinstance(self.ert_windows, (int, float)) \
                or not self.ert_windows > 1:
            raise ValueError(f"ert_windows={self.ert_windows!r} must be a number of windows > 1")
        if self.top_k is not None:
            positive("top_k", self.top_k, int)
        if self.num_experts is not None:
            positive("num_experts", self.num_experts, int)
        if self.capacity_factor is not None:
            positive("capacity_factor", self.capacity_factor)
        positive("expert_series_budget", self.expert_series_budget, int)
        positive("otlp_interval_seconds", self.otlp_interval_seconds)
        positive("export_timeout_seconds", self.export_timeout_seconds)
        positive("alert_resend_seconds", self.alert_resend_seconds)
        positive("alert_resolve_windows", self.alert_resolve_windows, int)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise ValueError(f"rank={self.rank!r} must be a non-negative integer")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring={self.scoring!r} must be one of {SCORINGS}")
        positive("dump_max_bytes", self.dump_max_bytes, int)
        positive("decision_slots", self.decision_slots, int)
        if isinstance(self.sample_decisions, bool) or not isinstance(self.sample_decisions, (int, float)) \
                or not 0.0 <= self.sample_decisions <= 1.0:
            raise ValueError(f"sample_decisions={self.sample_decisions!r} must be a fraction in [0, 1]")
        _check_gates(self.gates)
        from .placement.spec import check_option

        check_option(self.expert_placement)
        for name in ("model_name", "runbook_url"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}={value!r} must be a string")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise TypeError(f"dump_dir={self.dump_dir!r} must be a directory path (str or os.PathLike)")
        if self.alertmanager_url is not None:
            check_http_url("alertmanager_url", self.alertmanager_url, "http://127.0.0.1:9093")
        if self.otlp_endpoint is not None:
            check_http_url("otlp_endpoint", self.otlp_endpoint, "http://127.0.0.1:4318")


def _check_gates(gates) -> None:
    if gates is None or isinstance(gates, str):
        return
    if isinstance(gates, (list, tuple)) and gates and all(isinstance(g, str) for g in gates):
        return
    raise TypeError(f"gates={gates!r} must be a module name or pattern (str), or a non-empty list of them, "
                    "e.g. 'model.layers.*.mlp.gate'")


def check_http_url(option: str, url, example: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a host and a valid port."""
    what = f"{option}={url!r} must be an http:// or https:// URL with a host, such as {example!r}"
    if not isinstance(url, str):
        raise TypeError(what)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        hint = " (the scheme is missing)" if "://" not in url else f" (scheme {parts.scheme!r} is not supported)"
        raise ValueError(what + hint)
    if not parts.hostname:
        raise ValueError(what + " (no host)")
    try:
        parts.port  # raises ValueError when out of range or not a number
    except ValueError as error:
        raise ValueError(what + f" ({error}: ports are 1-65535)") from None
