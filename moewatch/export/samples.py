"""ExportState -> samples of every metric in :mod:`moewatch.schema` (shared by all exporters)."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Tuple

from .. import __version__
from ..health import MONITORING_STATES
from ..schema import DEFAULT_EXPERT_SERIES_BUDGET, EXPERT_FAMILIES, METRICS, PARALLEL_GROUPS, PREFIX
from .labels import encodable
from .state import ExportState, GateState, severity_value

# (label values in the metric's label order, value)
Sample = Tuple[Tuple[str, ...], float]

# Per-gate gauges read straight from a column of the latest window (see moewatch.windows).
WINDOW_GAUGES: Dict[str, str] = {
    "gate_window_tokens": "tokens",
    "gate_drop_ratio": "drop_rate",
    "gate_effective_experts": "effective_experts",
    "gate_top_share_ratio": "top_share",
    "gate_load_entropy_nats": "load_entropy",
    "gate_routing_entropy_nats": "entropy_mean",
    "gate_logit_std": "logit_std",
    "gate_logit_abs_max": "logit_absmax",
    "gate_top1_probability": "top1_prob_mean",
    "gate_top1_margin": "margin_mean",
    "gate_router_z_loss": "zloss_mean",
    "gate_dead_experts": "dead_experts",
}

# Per-gate gauges of the baseline: the median of a GateBaseline.frame() column (with a baseline).
BASELINE_GAUGES: Dict[str, str] = {
    "gate_baseline_effective_experts": "effective_experts",
    "gate_baseline_routing_entropy_nats": "entropy_mean",
    "gate_baseline_logit_std": "logit_std",
    "gate_baseline_top1_probability": "top1_prob_mean",
}


def admitted_expert_families(experts_per_gate: Sequence[int], budget: int = DEFAULT_EXPERT_SERIES_BUDGET) -> List[str]:
    """Per-expert families that fit in ``budget`` series, in schema order (most useful first)."""
    per_family = int(sum(experts_per_gate))
    admitted, used = [], 0
    for name in EXPERT_FAMILIES:
        if used + per_family > budget:
            break
        admitted.append(name)
        used += per_family
    return admitted


def _gate_samples(gate: GateState, base: Tuple[str, ...]) -> Dict[str, List[Sample]]:
    labels = base + (encodable(gate.name),)
    out: Dict[str, List[Sample]] = {
        "gate_tokens_total": [(labels, gate.tokens_total)],
        "gate_assignments_total": [(labels, float(gate.assignments_total.sum()))],
        "gate_dropped_assignments_total": [(labels, float(gate.dropped_total))],
        "gate_nonfinite_logits_total": [(labels, gate.nonfinite_total)],
        "gate_experts": [(labels, float(gate.num_experts))],
        "gate_top_k": [(labels, float(gate.top_k))],
        "gate_severity": [(labels, float(severity_value(gate.severity)))],
        "gate_monitoring_state": [(labels + (s,), 1.0 if gate.monitoring == s else 0.0) for s in MONITORING_STATES],
        "gate_check_severity": [(labels + (check,), float(severity_value(sev)))
                                for check, sev in sorted(gate.checks.items())],
    }
    for name, column in WINDOW_GAUGES.items():
        value = gate.window_value(column)
        out[name] = [(labels, value)] if value is not None else []
    for name, column in BASELINE_GAUGES.items():
        value = gate.baseline_medians.get(column)
        out[name] = [(labels, value)] if value is not None else []
    std = gate.window_value("logit_std")
    ratio = std / gate.baseline_logit_std if std is not None and gate.baseline_logit_std else None
    out["gate_logit_std_baseline_ratio"] = [(labels, ratio)] if ratio is not None else []
    out.update(_expert_parallel_samples(gate, labels))
    out["expert_assignments_total"] = [(labels + (str(e),), float(c))
                                       for e, c in enumerate(gate.assignments_total)]
    shares = gate.latest["expert_share"] if gate.latest is not None and gate.latest["assignments"] else None
    out["expert_load_share_ratio"] = ([(labels + (str(e),), float(s)) for e, s in enumerate(shares)]
                                      if shares is not None else [])
    return out


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _expert_parallel_samples(gate: GateState, labels: Tuple[str, ...]) -> Dict[str, List[Sample]]:
    """Series of expert parallelism under expert_placement= (none without a placement)."""
    out: Dict[str, List[Sample]] = {"gate_ep_ranks": [], "gate_ep_rank_load_share_ratio": [],
                                    "gate_ep_load_imbalance_ratio": [], "gate_alltoall_sends_per_token": [],
                                    "gate_alltoall_sends_total": []}
    if gate.ep_ranks is None:
        return out
    out["gate_ep_ranks"] = [(labels, float(gate.ep_ranks))]
    out["gate_alltoall_sends_total"] = [(labels, float(gate.alltoall_sends_total or 0))]
    balance = gate.ep_balance
    if balance is not None:
        out["gate_ep_rank_load_share_ratio"] = [(labels + (str(r),), float(v))
                                                for r, v in enumerate(balance["ep_rank_share"]) if _finite(v)]
        for name, key in (("gate_ep_load_imbalance_ratio", "ep_load_imbalance"),
                          ("gate_alltoall_sends_per_token", "alltoall_sends_per_token")):
            out[name] = [(labels, float(balance[key]))] if _finite(balance[key]) else []
    return out


def samples(state: ExportState, expert_families: Iterable[str]) -> Dict[str, List[Sample]]:
    """{metric name: samples} for every metric of the schema (per-expert ones only if admitted)."""
    base = tuple(encodable(v) for v in state.process_labels)  # names from odd directories too
    out: Dict[str, List[Sample]] = {m.name: [] for m in METRICS}
    admitted = set(expert_families)
    out[PREFIX + "up"] = [(base, 1.0 if state.up else 0.0)]
    out[PREFIX + "build_info"] = [(base + (__version__,), 1.0)]
    ranks = state.parallel_ranks
    if ranks:
        labels = tuple(str(ranks[g]) if g in ranks else "" for g in PARALLEL_GROUPS)  # "": no such group
        out[PREFIX + "parallel_rank_info"] = [(base + labels, 1.0)]
    out[PREFIX + "windows_total"] = [(base, float(state.windows_total))]
    out[PREFIX + "last_window_timestamp_seconds"] = [(base, float(state.last_window_time))]
    out[PREFIX + "internal_errors_total"] = [(base + (c,), float(n)) for c, n in sorted(state.errors.items())]
    out[PREFIX + "alerts_sent_total"] = [(base, float(state.alerts_sent))]
    out[PREFIX + "monitoring_state"] = [(base + (s,), 1.0 if state.monitoring == s else 0.0)
                                        for s in MONITORING_STATES]
    out[PREFIX + "baseline_loaded"] = [(base, 1.0 if state.baseline_loaded else 0.0)]
    out[PREFIX + "expert_series_enabled"] = [(base, 1.0 if admitted else 0.0)]
    for gate in state.gates:
        for name, rows in _gate_samples(gate, base).items():
            full = PREFIX + name
            if full in EXPERT_FAMILIES and full not in admitted:
                continue
            out[full].extend(rows)
    return out
