"""The all-to-all volume of a placement, and its rank load, measured from what a dump holds.

Traffic model: in expert parallelism a token is dispatched once to every rank that holds at
least one of its chosen experts (and combined back from each). So the volume of a token is the
number of distinct ranks among its experts, d in 1..k; a placement that puts experts chosen
together on one rank lowers d. Where the token's home rank is among them that copy is local;
with an unknown home (or a home drawn uniformly from the R ranks), the remote sends are
d (1 - 1/R) on average: proportional to d, so d ranks placements the same way.

- Exact (:func:`ranks_per_token`): from per-token decisions (the dump's sampled decisions),
  each token's experts as a set. A hypergraph measure: each token is a hyperedge of its k experts.
- Pairwise (:func:`pairwise_ranks_per_token`): from the co-selection counts C only. For one
  token, d = k - (pairs of its experts on one rank) + (triples on one rank) - ... ; keeping the
  first two terms is exact for k <= 2 and, for k > 2, a lower bound (Bonferroni) that is tight
  while few tokens put three or more experts on one rank.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def ranks_per_token(experts: Iterable, ranks: np.ndarray) -> float:
    """Mean number of distinct ranks among each token's experts (``experts``: one id list per token)."""
    rows = [np.asarray(e, dtype=np.int64) for e in experts]
    if not rows:
        return float("nan")
    width = max(r.size for r in rows)
    table = np.full((len(rows), width), -1, dtype=np.int64)  # [N, k] -1: no expert
    for i, r in enumerate(rows):
        table[i, :r.size] = r
    on = np.where(table >= 0, ranks[np.clip(table, 0, None)], -1)  # [N, k] rank of each expert
    on.sort(axis=1)
    distinct = (on >= 0) & np.concatenate([np.ones((len(rows), 1), bool), on[:, 1:] != on[:, :-1]], axis=1)
    return float(distinct.sum(axis=1).mean())


def pairwise_ranks_per_token(coselection: np.ndarray, tokens: float, ranks: np.ndarray) -> float:
    """Mean distinct ranks per token from the symmetric co-selection [E, E] of ``tokens`` tokens:
    (sum_i C[i, i] - sum_{i<j, same rank} C[i, j]) / tokens (exact for k <= 2, a lower bound above)."""
    if tokens <= 0:
        return float("nan")
    same = ranks[:, None] == ranks[None, :]  # [E, E]
    together = np.triu(coselection, 1)[same].sum()
    return float((np.trace(coselection) - together) / tokens)


def load_imbalance(loads: np.ndarray, ranks: np.ndarray, num_ranks: int) -> float:
    """max / mean of the assignments per rank, from the assignments per expert [E]."""
    per_rank = np.bincount(ranks, weights=loads, minlength=num_ranks)
    total = per_rank.sum()
    return float(per_rank.max() * num_ranks / total) if total > 0 else float("nan")
