"""Plain numpy (and Python sets) references of the placement statistics, token by token.

Deliberately naive: each token's chosen experts become a set, and every pair is counted by hand,
so the hot path's vectorised versions are checked against something obviously right.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def numpy_coselection(indices, weights: Optional[np.ndarray], num_experts: int) -> np.ndarray:
    """int64 [E, E], symmetric: [i, j] tokens (weight != 0) that chose i and j; [i, i] that chose i."""
    indices = np.asarray(indices)
    indices = indices.reshape(indices.shape[0], -1) if indices.ndim != 2 else indices
    out = np.zeros((num_experts, num_experts), dtype=np.int64)
    for t, row in enumerate(indices):
        if weights is not None and not weights[t]:
            continue
        chosen = sorted(set(int(e) for e in row))
        for i in chosen:
            for j in chosen:
                out[i, j] += 1
    return out


def numpy_rank_tokens(indices, weights: Optional[np.ndarray], ranks: np.ndarray) -> np.ndarray:
    """int64 [E]: per rank r, tokens (weight != 0) with at least one chosen expert on rank r."""
    indices = np.asarray(indices)
    indices = indices.reshape(indices.shape[0], -1) if indices.ndim != 2 else indices
    out = np.zeros(len(ranks), dtype=np.int64)
    for t, row in enumerate(indices):
        if weights is not None and not weights[t]:
            continue
        for r in {int(ranks[int(e)]) for e in row}:
            out[r] += 1
    return out
