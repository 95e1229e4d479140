"""``moewatch placement``: fit a placement per gate on a dump's earlier windows, measure it on the later ones.

The dump's windows are split in time: the first ``1 - holdout`` of them are fitted on (their
co-selection spans, expert loads and sampled decisions), the last ``holdout`` are held out, and
both the current and the proposed placement are measured on the held-out windows only: the
volume exactly per token from the held-out sampled decisions when the dump has them, else by
the pairwise model from the held-out co-selection spans (``traffic``), and the rank load from
the held-out windows' assignments. Co-selection spans that straddle the split are used by neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from .history import matrix
from .propose import Proposal, propose
from .spec import Placement, PlacementError, _int_list, contiguous, load_placement_file
from .traffic import load_imbalance, pairwise_ranks_per_token, ranks_per_token

MIN_DECISIONS = 50  # sampled decisions a side needs before the volume is measured exactly per token


@dataclass
class Measure:
    ranks_per_token: float  # distinct ranks a token is dispatched to (all-to-all volume per token)
    imbalance: float  # max/mean rank load
    method: str  # "exact (N sampled tokens)" or "pairwise (N tokens)"


@dataclass
class GatePlan:
    gate: str
    num_experts: int
    top_k: int
    fit_windows: List[int]
    held_windows: List[int]
    current: np.ndarray
    proposal: Proposal
    held_current: Measure
    held_proposed: Measure
    notes: List[str] = field(default_factory=list)


def _coselection_of(spans: pd.DataFrame, experts: int) -> Optional[np.ndarray]:
    if spans.empty:
        return None
    return np.sum([matrix(row) for _, row in spans.iterrows()], axis=0).reshape(experts, experts)


def _from_decisions(experts_lists, num_experts: int) -> np.ndarray:
    out = np.zeros((num_experts, num_experts), dtype=np.int64)
    for chosen in experts_lists:
        ids = np.unique(np.asarray(chosen, dtype=np.int64))
        out[np.ix_(ids, ids)] += 1
    return out


def current_placement(current: str, gates: List[dict], num_ranks: int) -> Dict[str, np.ndarray]:
    """{gate: ranks [E]} of ``--current``: "contiguous" or a placement file."""
    if current == "contiguous":
        return {g["name"]: contiguous(int(g["num_experts"]), num_ranks) for g in gates}
    doc = load_placement_file(current)
    if int(doc["ranks"]) != num_ranks:
        raise PlacementError(f"--current {current!r} places experts on {doc['ranks']} ranks, not --ranks {num_ranks}")
    out = {}
    for g in gates:
        ranks = doc["gates"].get(g["name"])
        if ranks is None:
            raise PlacementError(f"--current {current!r} has no placement for gate {g['name']!r}")
        vector = _int_list(ranks, f"--current {current!r}, gate {g['name']!r}")
        if vector.shape != (int(g["num_experts"]),) or vector.min() < 0 or vector.max() >= num_ranks:
            raise PlacementError(f"--current {current!r}: gate {g['name']!r} needs {g['num_experts']} ranks "
                                 f"in 0..{num_ranks - 1}")
        out[g["name"]] = vector
    return out


def plan(dump, num_ranks: int, current: str = "contiguous", max_imbalance: float = 1.1,
         holdout: float = 1 / 3, seeds: int = 8) -> List[GatePlan]:
    """One :class:`GatePlan` per gate of ``dump`` (a ``moewatch.dump.Dump``)."""
    if not 0 < holdout < 1:
        raise PlacementError(f"--holdout {holdout} must be a fraction between 0 and 1")
    if not max_imbalance >= 1:
        raise PlacementError(f"--max-imbalance {max_imbalance} must be at least 1 (max/mean rank load)")
    windows = sorted(int(w) for w in dump.windows["window"].unique()) if len(dump.windows) else []
    if len(windows) < 2:
        raise PlacementError(f"{dump.path}: {len(windows)} window(s); fitting and holding out need at least 2")
    held_count = min(len(windows) - 1, max(1, int(round(len(windows) * holdout))))
    fit_windows, held_windows = windows[:-held_count], windows[-held_count:]
    split = fit_windows[-1]
    gates = dump.gates
    placed = current_placement(current, gates, num_ranks)
    out = []
    for g in gates:
        name, experts, top_k = g["name"], int(g["num_experts"]), int(g["top_k"])
        if num_ranks > experts:
            raise PlacementError(f"--ranks {num_ranks}: gate {name!r} has only {experts} experts")
        rows = dump.windows[dump.windows["gate"] == name]
        fit_rows, held_rows = rows[rows["window"] <= split], rows[rows["window"] > split]
        loads_fit = np.sum(np.stack(fit_rows["expert_counts"].to_numpy()), axis=0).astype(float)
        loads_held = np.sum(np.stack(held_rows["expert_counts"].to_numpy()), axis=0).astype(float)
        spans = dump.coselection[dump.coselection["gate"] == name]
        fit_spans = spans[spans["window"] <= split]
        held_spans = spans[spans["window_first"] > split]
        decisions = dump.decisions
        if len(decisions):
            decisions = decisions[(decisions["gate"] == name) & decisions["valid"]]
        fit_dec = decisions[(decisions["window"] >= 0) & (decisions["window"] <= split)] if len(decisions) else decisions
        held_dec = decisions[decisions["window"] > split] if len(decisions) else decisions
        notes = []
        cos_fit = _coselection_of(fit_spans, experts)
        if cos_fit is None:
            if len(fit_dec) < MIN_DECISIONS:
                raise PlacementError(f"{dump.path}: gate {name!r} has no co-selection and too few sampled decisions "
                                     "in the fitted windows (dump with moewatch >= schema 2, or sample_decisions=)")
            cos_fit = _from_decisions(fit_dec["experts"], experts)
            notes.append("fitted on the sampled decisions' co-selection (the dump has no co-selection spans)")
        fit_tokens = float(fit_rows[fit_rows["window"].isin(
            [w for _, s in fit_spans.iterrows() for w in range(s["window_first"], s["window"] + 1)])]["tokens"].sum())
        if len(fit_dec) >= MIN_DECISIONS:
            fit_experts = list(fit_dec["experts"])
            score = lambda ranks: ranks_per_token(fit_experts, ranks)  # noqa: E731
        else:
            score = lambda ranks: pairwise_ranks_per_token(cos_fit, fit_tokens, ranks)  # noqa: E731
        proposal = propose(cos_fit, loads_fit, num_ranks, max_imbalance, score, current=placed[name], seeds=seeds)
        if not proposal.within_bound:
            notes.append(f"no placement with {experts // num_ranks} experts per rank keeps the fitted load within "
                         f"{max_imbalance}: proposed the most balanced one")
        measures = []
        for ranks in (placed[name], proposal.ranks):
            if len(held_dec) >= MIN_DECISIONS:
                volume = ranks_per_token(list(held_dec["experts"]), ranks)
                method = f"exact per token ({len(held_dec)} sampled tokens)"
            else:
                cos_held = _coselection_of(held_spans, experts)
                if cos_held is None:
                    raise PlacementError(f"{dump.path}: gate {name!r}: the held-out windows have neither co-selection "
                                         "spans nor sampled decisions; hold out more windows (--holdout)")
                covered = [w for _, s in held_spans.iterrows() for w in range(s["window_first"], s["window"] + 1)]
                tokens = float(held_rows[held_rows["window"].isin(covered)]["tokens"].sum())
                volume = pairwise_ranks_per_token(cos_held, tokens, ranks)
                method = f"pairwise model ({int(tokens)} tokens{'' if top_k <= 2 else ', a lower bound for k > 2'})"
            measures.append(Measure(volume, load_imbalance(loads_held, ranks, num_ranks), method))
        out.append(GatePlan(name, experts, top_k, fit_windows, held_windows, placed[name], proposal,
                            measures[0], measures[1], notes))
    return out


def placement_json(plans: List[GatePlan], num_ranks: int) -> dict:
    """The ``-o`` file: ``{"ranks": R, "gates": {name: [rank of expert 0, ...]}}``."""
    return Placement(num_ranks, {p.gate: p.proposal.ranks for p in plans}).to_json()


def _span(windows: List[int]) -> str:
    return f"{windows[0]}-{windows[-1]}" if len(windows) > 1 else str(windows[0])


def report_text(plans: List[GatePlan], num_ranks: int, max_imbalance: float, current: str) -> str:
    """The table ``moewatch placement`` prints."""
    from .propose import PARTITIONER

    lines = [f"Expert placement on {num_ranks} ranks (current: {current}; load bound max/mean <= {max_imbalance}).",
             f"Partitioner: {PARTITIONER}.",
             "Volume: distinct ranks a token is dispatched to (all-to-all sends per token, its home rank "
             "included); measured on held-out windows only.", ""]
    header = f"  {'placement':<9} {'ranks/token':>11} {'max/mean load':>13}  {'change':>7}"
    for p in plans:
        lines.append(f"{p.gate} ({p.num_experts} experts, top-{p.top_k}): fitted on windows {_span(p.fit_windows)}, "
                     f"held out {_span(p.held_windows)}; {p.held_proposed.method}")
        lines.append(header)
        base = p.held_current.ranks_per_token
        for label, m in (("current", p.held_current), ("proposed", p.held_proposed)):
            change = "" if label == "current" or not base else f"{(m.ranks_per_token / base - 1):+.1%}"
            lines.append(f"  {label:<9} {m.ranks_per_token:>11.3f} {m.imbalance:>13.3f}  {change:>7}")
        lines.append(f"  proposed ranks of experts 0..{p.num_experts - 1}: {p.proposal.ranks.tolist()}")
        lines += [f"  note: {n}" for n in p.notes]
        lines.append("")
    return "\n".join(lines)
