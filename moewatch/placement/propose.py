"""A placement with E/R experts per rank, rank load within a bound, and a low all-to-all volume.

The partitioner is METIS (through ``pymetis``, the ``[placement]`` extra): multilevel k-way
partitioning of the co-selection graph (experts are vertices, an edge i-j weighs the tokens that
chose i and j together, a vertex weighs its expert's assignments), which minimises the weight of
the edges cut, i.e. the co-selected pairs split across ranks, while keeping the parts' vertex
weight (the rank load) balanced. METIS bounds part weights, not part sizes, so each partition is
then given exactly E/R experts per rank by a minimum-cost assignment of experts to rank slots
(``scipy.optimize.linear_sum_assignment``) that keeps every expert on its METIS part where the
sizes allow and moves the experts least tied to their part otherwise. Several METIS runs (seeds,
weightings, imbalance factors) give candidates; the proposal is the candidate within the load
bound (on the fitted windows) with the lowest fitted volume, measured exactly per token when the
dump has sampled decisions, else by the pairwise model (``traffic``). The current placement is
a candidate too, so a proposal never fits worse than what runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

PARTITIONER = "METIS k-way (pymetis) on the co-selection graph, sizes fixed by scipy linear_sum_assignment"


class PartitionerMissing(ImportError):
    """pymetis is not installed (``pip install 'moewatch[placement]'``)."""


@dataclass
class Proposal:
    ranks: np.ndarray  # int64 [E] rank of each expert
    fitted_volume: float  # ranks per token on the fitted data
    fitted_imbalance: float  # max/mean rank load on the fitted windows
    within_bound: bool
    candidates: int  # distinct placements compared


def rank_sizes(num_experts: int, num_ranks: int) -> np.ndarray:
    """Experts per rank: E/R each (the first E mod R ranks one more when R does not divide E)."""
    return np.array([num_experts // num_ranks + (r < num_experts % num_ranks) for r in range(num_ranks)])


def fix_sizes(parts: np.ndarray, coselection: np.ndarray, num_ranks: int) -> np.ndarray:
    """The partition ``parts`` [E] with exactly :func:`rank_sizes` experts per rank, by a minimum-cost
    assignment of experts to rank slots: an expert's cost on rank r is minus its co-selection with
    the experts METIS put on r, less a bonus for staying on its own part."""
    from scipy.optimize import linear_sum_assignment

    num_experts = parts.shape[0]
    off = coselection - np.diag(np.diag(coselection))  # [E, E] pairs only
    affinity = np.stack([off[:, parts == r].sum(axis=1) for r in range(num_ranks)], axis=1).astype(float)  # [E, R]
    stay = affinity.max() + 1.0 if affinity.size else 1.0
    affinity[np.arange(num_experts), parts] += stay
    slot_rank = np.repeat(np.arange(num_ranks), rank_sizes(num_experts, num_ranks))  # [E] rank of each slot
    rows, cols = linear_sum_assignment(-affinity[:, slot_rank])  # [E] expert -> slot
    out = np.empty(num_experts, dtype=np.int64)
    out[rows] = slot_rank[cols]
    return out


def _metis_runs(coselection: np.ndarray, loads: np.ndarray, num_ranks: int, seeds: int) -> List[np.ndarray]:
    try:
        import pymetis
    except ImportError as error:
        raise PartitionerMissing("moewatch placement partitions with METIS through pymetis: "
                                 "pip install 'moewatch[placement]' (or pip install pymetis)") from error
    num_experts = coselection.shape[0]
    off = np.triu(coselection, 1)
    off = off + off.T  # [E, E] symmetric, no diagonal
    xadj, adjncy, eweights = [0], [], []
    for i in range(num_experts):
        (nbrs,) = np.nonzero(off[i])
        adjncy += nbrs.tolist()
        eweights += off[i, nbrs].astype(np.int64).tolist()
        xadj.append(len(adjncy))
    scale = max(1.0, float(loads.max()) / 1e6)  # METIS wants int weights; keep them well inside int32
    weightings = [np.maximum(1, np.round(loads / scale)).astype(np.int64).tolist(), [1] * num_experts]
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2
        graph = dict(adjacency=pymetis.CSRAdjacency(xadj, adjncy))
    else:
        graph = dict(xadj=xadj, adjncy=adjncy)
    runs = []
    for vweights in weightings:
        for ufactor in (1, 30, 100, 300):
            for seed in range(seeds):
                options = pymetis.Options(seed=seed, ufactor=ufactor)
                _, parts = pymetis.part_graph(num_ranks, **graph, eweights=eweights or None,
                                              vweights=vweights, options=options)
                runs.append(np.asarray(parts, dtype=np.int64))
    return runs


def propose(coselection: np.ndarray, loads: np.ndarray, num_ranks: int, max_imbalance: float,
            score: Callable[[np.ndarray], float], current: Optional[np.ndarray] = None, seeds: int = 8) -> Proposal:
    """Propose a placement for one gate. coselection [E, E] symmetric and loads [E] (assignments per
    expert) of the fitted windows; score(ranks [E]) -> fitted ranks per token (lower is better)."""
    from .traffic import load_imbalance

    num_experts = coselection.shape[0]
    if not 1 <= num_ranks <= num_experts:
        raise ValueError(f"{num_ranks} ranks for {num_experts} experts: ranks must be from 1 to E")
    if num_ranks == 1:
        candidates = [np.zeros(num_experts, dtype=np.int64)]
    elif num_ranks == num_experts:
        candidates = [np.arange(num_experts, dtype=np.int64)]
    else:
        candidates = [fix_sizes(p, coselection, num_ranks) for p in _metis_runs(coselection, loads, num_ranks, seeds)]
    if current is not None and current.max() < num_ranks and sorted(np.bincount(current, minlength=num_ranks)) \
            == sorted(rank_sizes(num_experts, num_ranks)):  # the current placement, when it has E/R per rank
        candidates.append(np.asarray(current, dtype=np.int64))
    seen, scored = set(), []
    for ranks in candidates:
        key = _canonical(ranks)
        if key in seen:
            continue
        seen.add(key)
        imbalance = load_imbalance(loads, ranks, num_ranks)
        scored.append((ranks, score(ranks), imbalance))
    feasible = [c for c in scored if c[2] <= max_imbalance]
    if feasible:
        best = min(feasible, key=lambda c: (c[1], c[2]))
    else:  # nothing within the bound: the most balanced
        best = min(scored, key=lambda c: (c[2], c[1]))
    return Proposal(best[0], best[1], best[2], bool(feasible), len(scored))


def _canonical(ranks: np.ndarray) -> tuple:
    """The partition up to renaming the ranks (ranks numbered by first appearance)."""
    names: dict = {}
    return tuple(names.setdefault(int(r), len(names)) for r in ranks)
