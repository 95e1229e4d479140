"""Every metric moewatch exports: name, type, labels, unit and help, in one place.

The Prometheus collector and the OpenTelemetry instruments are both built from this list, the
metrics table in ``docs/metrics.md`` is generated from it (``python -m moewatch.schema``), and the
tests check that alert rules and dashboards only name metrics listed here.

Conventions (Prometheus naming): prefix ``moewatch_``, base units (seconds, ratios in [0, 1], not
percentages), counters end in ``_total``. Every series carries ``model`` and ``rank``; per-gate
series add ``layer`` (the gate's module name); per-expert series add ``expert`` (its index).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .health import MONITORING_STATES, SEVERITIES

PREFIX = "moewatch_"

# Label sets by level.
PROCESS_LABELS: Tuple[str, ...] = ("model", "rank")
GATE_LABELS: Tuple[str, ...] = PROCESS_LABELS + ("layer",)
# mon.parallel_ranks keys, in label order: tensor, pipeline, data, expert parallel
PARALLEL_GROUPS: Tuple[str, ...] = ("tp", "pp", "dp", "ep")
PARALLEL_LABELS: Tuple[str, ...] = tuple(f"{group}_rank" for group in PARALLEL_GROUPS)
EXPERT_LABELS: Tuple[str, ...] = GATE_LABELS + ("expert",)
# Per rank of the expert placement (expert_placement=): `ep_rank` is a rank of the expert-parallel
# group the placement describes, not the `rank` of the exporting process. At most R <= E series a gate.
EP_RANK_LABELS: Tuple[str, ...] = GATE_LABELS + ("ep_rank",)

# Numeric encoding of a severity in the *_severity gauges.
SEVERITY_VALUE: Dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

# Values of the `check` label (the keys of mon.health().gates[name].checks). One set for both
# detector modes: a check keeps its name whether a baseline or the absolute rules judge it, so a
# dashboard or alert keyed on it still works when a baseline is added.
# name -> (what it watches, the modes that judge it)
CHECKS: Dict[str, Tuple[str, str]] = {
    "load": ("the expert load as a whole: divergence of the shares of assignments from the baseline's",
             "baseline"),
    "overload": ("the busiest expert: far more than its share of assignments (without a baseline: chosen by "
                 "over 80% of tokens)", "baseline, absolute"),
    "underload": ("the idlest expert: far less than its share of assignments, or none at all (dead)",
                  "baseline, absolute"),
    "concentration": ("effective experts, exp(entropy of the shares of assignments): too few", "baseline, absolute"),
    "logit_std": ("router-logit standard deviation (saturation when far above the baseline)", "baseline"),
    "top1_prob": ("mean routing probability of each token's first choice", "baseline"),
    "entropy": ("mean per-token routing entropy", "baseline"),
    "drop_rate": ("dropped assignments / assignments", "baseline, absolute"),
    "nonfinite": ("NaN or infinite router logits", "baseline, absolute"),
}
# The checks the absolute rules (no baseline) judge: a subset of CHECKS, same names, same meaning.
ABSOLUTE_CHECKS: Tuple[str, ...] = tuple(c for c, (_, modes) in CHECKS.items() if "absolute" in modes)

# Units as written in the docs -> UCUM units for OpenTelemetry instruments.
OTEL_UNITS: Dict[str, str] = {
    "": "1", "ratio": "1", "seconds": "s", "tokens": "{token}", "assignments": "{assignment}",
    "experts": "{expert}", "nats": "1", "logits": "1", "errors": "{error}", "windows": "{window}",
    "series": "{series}", "severity": "1", "logits (non-finite)": "{logit}",
}


@dataclass(frozen=True)
class Metric:
    """One exported metric family."""

    name: str  # Prometheus name, including the ``_total`` suffix of counters
    type: str  # "counter" or "gauge"
    labels: Tuple[str, ...]
    unit: str  # a key of OTEL_UNITS
    help: str
    source: str = ""  # the windows() column or accessor the value comes from (for the docs)

    @property
    def level(self) -> str:
        if "expert" in self.labels:
            return "expert"
        return "gate" if "layer" in self.labels else "process"

    @property
    def base_name(self) -> str:
        """Name without the ``_total`` suffix (what prometheus-client and OpenTelemetry take)."""
        return self.name[: -len("_total")] if self.name.endswith("_total") else self.name

    @property
    def otel_unit(self) -> str:
        return OTEL_UNITS[self.unit]


def _m(name: str, type_: str, labels: Tuple[str, ...], unit: str, help_: str, source: str = "") -> Metric:
    return Metric(PREFIX + name, type_, labels, unit, help_, source)


C, G = "counter", "gauge"

METRICS: List[Metric] = [
    # -- the process and the monitor itself ------------------------------------------------
    _m("up", G, PROCESS_LABELS, "",
       "1 while the monitor is attached to its model, 0 after detach()."),
    _m("build_info", G, PROCESS_LABELS + ("version",), "",
       "Always 1; the version label is the moewatch version."),
    _m("parallel_rank_info", G, PROCESS_LABELS + PARALLEL_LABELS, "",
       "Always 1: the process's rank in each parallel group of the serving engine that runs it "
       "(tensor, pipeline, data, expert parallel; a label is empty where the engine has no such "
       "group). Only under an engine that reports them (vLLM). Join on rank to slice any series "
       "by them.", "mon.parallel_ranks"),
    _m("windows_total", C, PROCESS_LABELS, "windows",
       "Windows closed since attach (only windows that saw traffic count)."),
    _m("last_window_timestamp_seconds", G, PROCESS_LABELS, "seconds",
       "Unix time at which the latest window closed; 0 before the first window.", "t_end"),
    _m("internal_errors_total", C, PROCESS_LABELS + ("component",), "errors",
       "Internal failures by component (hook, reader, listener, prometheus, otlp, alertmanager, ...). "
       "Counted, never raised into the model.", "mon.error_counts()"),
    _m("alerts_sent_total", C, PROCESS_LABELS, "",
       "Alert batches Alertmanager accepted (HTTP 2xx)."),
    _m("monitoring_state", G, PROCESS_LABELS + ("state",), "",
       "1 for the monitor's current state, 0 for the others (state: "
       + ", ".join(MONITORING_STATES) + "). no_data: no window has closed yet; failing: hooks, the "
       "reader or the detector fail, so the severities are not a verdict on the router.",
       "mon.health().monitoring"),
    _m("baseline_loaded", G, PROCESS_LABELS, "",
       "1 when the detector compares against a baseline, 0 when it applies absolute rules."),
    _m("expert_series_enabled", G, PROCESS_LABELS, "",
       "1 when per-expert families are exported, 0 when the series budget left them out."),
    # -- per gate: totals since attach -----------------------------------------------------
    _m("gate_tokens_total", C, GATE_LABELS, "tokens",
       "Tokens routed by the gate since attach (padding excluded).", "tokens"),
    _m("gate_assignments_total", C, GATE_LABELS, "assignments",
       "Token-to-expert assignments (top-k per token) since attach.", "assignments"),
    _m("gate_dropped_assignments_total", C, GATE_LABELS, "assignments",
       "Assignments dropped by expert capacity since attach (would-be drops with capacity_factor=).",
       "mon.dropped()"),
    _m("gate_nonfinite_logits_total", C, GATE_LABELS, "logits (non-finite)",
       "Router logits that were NaN or infinite, since attach.", "nonfinite_logits"),
    # -- per gate: the latest window -------------------------------------------------------
    _m("gate_window_tokens", G, GATE_LABELS, "tokens",
       "Tokens in the latest window.", "tokens"),
    _m("gate_drop_ratio", G, GATE_LABELS, "ratio",
       "Dropped assignments / assignments in the latest window.", "drop_rate"),
    _m("gate_effective_experts", G, GATE_LABELS, "experts",
       "exp(entropy of the expert load) in the latest window: N when balanced, 1 when collapsed.",
       "effective_experts"),
    _m("gate_top_share_ratio", G, GATE_LABELS, "ratio",
       "Share of the assignments taken by the busiest expert in the latest window.", "top_share"),
    _m("gate_load_entropy_nats", G, GATE_LABELS, "nats",
       "Entropy of the expert load distribution in the latest window (log N when balanced).",
       "load_entropy"),
    _m("gate_routing_entropy_nats", G, GATE_LABELS, "nats",
       "Mean per-token entropy of the routing distribution in the latest window.", "entropy_mean"),
    _m("gate_logit_std", G, GATE_LABELS, "logits",
       "Standard deviation of the router logits in the latest window.", "logit_std"),
    _m("gate_logit_std_baseline_ratio", G, GATE_LABELS, "ratio",
       "Logit std of the latest window / the baseline's typical logit std (only with a baseline).",
       "logit_std / baseline"),
    _m("gate_baseline_effective_experts", G, GATE_LABELS, "experts",
       "Median effective experts over the baseline's windows (only with a baseline).",
       "baseline: effective_experts"),
    _m("gate_baseline_routing_entropy_nats", G, GATE_LABELS, "nats",
       "Median mean per-token routing entropy over the baseline's windows (only with a baseline).",
       "baseline: entropy_mean"),
    _m("gate_baseline_logit_std", G, GATE_LABELS, "logits",
       "Median router logit std over the baseline's windows (only with a baseline).",
       "baseline: logit_std"),
    _m("gate_baseline_top1_probability", G, GATE_LABELS, "ratio",
       "Median mean top-1 probability over the baseline's windows (only with a baseline).",
       "baseline: top1_prob_mean"),
    _m("gate_logit_abs_max", G, GATE_LABELS, "logits",
       "Largest |router logit| in the latest window.", "logit_absmax"),
    _m("gate_top1_probability", G, GATE_LABELS, "ratio",
       "Mean routing probability of each token's first choice in the latest window.", "top1_prob_mean"),
    _m("gate_top1_margin", G, GATE_LABELS, "ratio",
       "Mean gap between the first and second routing probability in the latest window.", "margin_mean"),
    _m("gate_router_z_loss", G, GATE_LABELS, "",
       "Mean router z-loss, logsumexp(logits)^2, in the latest window.", "zloss_mean"),
    _m("gate_dead_experts", G, GATE_LABELS, "experts",
       "Experts that received no assignment in the latest window.", "dead_experts"),
    _m("gate_experts", G, GATE_LABELS, "experts",
       "Number of experts behind the gate (N).", "num_experts"),
    _m("gate_top_k", G, GATE_LABELS, "experts",
       "Experts chosen per token (k).", "top_k"),
    _m("gate_severity", G, GATE_LABELS, "severity",
       "Detector verdict for the gate after the latest window: 0 ok, 1 drift, 2 collapse.",
       "mon.health().gates[layer].severity"),
    _m("gate_monitoring_state", G, GATE_LABELS + ("state",), "",
       "1 for the gate's state in the latest window, 0 for the others (state: "
       + ", ".join(MONITORING_STATES) + "). no_data: the gate saw no token; failing: its hook failed.",
       "mon.health().gates[layer].monitoring"),
    _m("gate_check_severity", G, GATE_LABELS + ("check",), "severity",
       "Verdict of one detector check for the gate: 0 ok, 1 drift, 2 collapse.",
       "mon.health().gates[layer].checks"),
    # -- per gate, expert parallelism under expert_placement= (absent without a placement) --
    _m("gate_ep_ranks", G, GATE_LABELS, "",
       "Ranks (R) of the expert placement given with expert_placement=.", "mon.placement.num_ranks"),
    _m("gate_ep_rank_load_share_ratio", G, EP_RANK_LABELS, "ratio",
       "Share of the gate's assignments that go to the experts placed on rank ep_rank, in the latest "
       "window (1/R when balanced).", "ep_rank_share"),
    _m("gate_ep_load_imbalance_ratio", G, GATE_LABELS, "",
       "Max / mean rank load of the latest window under the placement: 1 when balanced, R when one rank "
       "takes every assignment (vLLM's balancedness is its inverse).", "ep_load_imbalance"),
    _m("gate_alltoall_sends_per_token", G, GATE_LABELS, "",
       "Mean number of other ranks a token of the latest window is sent to under the placement: the "
       "distinct ranks holding its experts, less its home rank when the process's rank is known.",
       "alltoall_sends_per_token"),
    _m("gate_alltoall_sends_total", C, GATE_LABELS, "tokens",
       "Token copies an all-to-all dispatch sends to other ranks under the placement, since attach.",
       "alltoall_sends"),
    # -- per expert (within the series budget) ---------------------------------------------
    _m("expert_assignments_total", C, EXPERT_LABELS, "assignments",
       "Assignments of tokens to the expert since attach (mon.counts() at the latest window close).", "mon.counts()"),
    _m("expert_load_share_ratio", G, EXPERT_LABELS, "ratio",
       "The expert's share of the gate's assignments in the latest window.", "expert_share"),
]

BY_NAME: Dict[str, Metric] = {m.name: m for m in METRICS}

# Per-expert families in the order the series budget admits them (most useful first).
EXPERT_FAMILIES: Tuple[str, ...] = tuple(m.name for m in METRICS if m.level == "expert")

# Default series budget for the per-expert families (together): ~10k series per process.
DEFAULT_EXPERT_SERIES_BUDGET = 10_000


def metric(name: str) -> Metric:
    """The metric called ``name`` (with or without the ``moewatch_`` prefix)."""
    key = name if name.startswith(PREFIX) else PREFIX + name
    try:
        return BY_NAME[key]
    except KeyError:
        raise KeyError(f"{name!r} is not a moewatch metric; see moewatch.schema.METRICS") from None


def markdown() -> str:
    """The metrics table of ``docs/metrics.md``."""
    lines = [
        "# Metrics",
        "",
        "<!-- Generated by `python -m moewatch.schema > docs/metrics.md`; do not edit by hand. -->",
        "",
        "Every metric moewatch exports to Prometheus (`mon.serve_prometheus()`) and to OpenTelemetry",
        "(`meter_provider=` / `otlp_endpoint=`). Names follow Prometheus conventions: prefix `moewatch_`,",
        "base units, ratios in [0, 1], counters end in `_total`. OpenTelemetry instruments carry the same",
        "name without `_total` (counters are observable counters, window statistics observable gauges)",
        "and the same attributes.",
        "",
        "Labels: `model` (the `model_name=` option, else the model's config name), `rank` (from",
        "`torch.distributed`, else `RANK`, else `0`), `layer` (the gate's module name), `expert` (its",
        "index), `ep_rank` (a rank of the `expert_placement=` option, R series a gate at most; on",
        "`moewatch_parallel_rank_info`, the process's own expert-parallel rank), `tp_rank`, `pp_rank`,",
        "`dp_rank` (the process's tensor, pipeline and data parallel ranks, as its serving engine",
        "reports them),",
        "`component` (the failing part), `check` (a detector check, values below), `state` (a",
        "monitoring state: " + ", ".join(f"`{s}`" for s in MONITORING_STATES) + "), `version`.",
        "",
        "Gauges described as *in the latest window* hold the most recently closed window; counters",
        "count since `attach()` up to that window's close (windows close at least every",
        "`window_seconds=`, so they trail live traffic by at most that). Severities are encoded as "
        + ", ".join(f"{v} = {k}" for k, v in SEVERITY_VALUE.items()) + ".",
        "",
        "Per-expert families are exported while (experts over all gates) x (families) stays within",
        f"`expert_series_budget=` (default {DEFAULT_EXPERT_SERIES_BUDGET}), admitted in table order;",
        "per-gate summaries are always exported.",
        "",
        "| Metric | Type | Unit | Labels | Description | Source |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels)
        lines.append(f"| `{m.name}` | {m.type} | {m.unit or '-'} | {labels} | {m.help} | {f'`{m.source}`' if m.source else '-'} |")
    lines += [
        "",
        "## Values of the `check` label",
        "",
        "`moewatch_gate_check_severity` has one series per check the detector judges for the gate (the",
        "keys of `mon.health().gates[layer].checks`). A check has the same name with and without a",
        "baseline; without one, only the checks marked *absolute* are judged ([detector.md](detector.md)).",
        "",
        "| check | watches | judged |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {what} | {modes} |" for name, (what, modes) in CHECKS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
