"""``attach`` options: defaults and validation with messages that say what to do."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

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
    # Detector (moewatch.detector).
    ert_windows: float = 100_000  # expected windows between false alarms, all gates together
    persistence: int = 2  # a moderate change must show in this many consecutive windows

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
        if not 0.0 <= self.sample_decisions <= 1.0:
            raise ValueError(f"sample_decisions={self.sample_decisions!r} must be a fraction in [0, 1]")
