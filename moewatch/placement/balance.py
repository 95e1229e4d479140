"""Expert-parallel balance of one window and gate under a placement (host-side numpy).

From a window's counts (``hotpath.layout``): assignments per expert (row 0) and, per rank r,
the traffic tokens with at least one expert on r (row 2, which the hot path fills when a
placement is set). The all-to-all volume is the number of (token, rank) sends a dispatch makes:
each token goes once to every rank that holds one of its experts; when the token's home rank
(the rank whose process routes it) is known, the copy for that rank is local and not counted.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ..hotpath.layout import ASSIGNED, RANK_TOKENS


def rank_loads(assignments: np.ndarray, ranks: np.ndarray, num_ranks: int) -> np.ndarray:
    """int64 [R]: assignments per rank (assignments [E] per expert, ranks [E] per expert)."""
    return np.bincount(ranks, weights=assignments, minlength=num_ranks).astype(np.int64)


def imbalance(loads: np.ndarray) -> float:
    """max / mean of the rank loads [R]: 1 when balanced, R when one rank takes everything; NaN without load."""
    total = float(loads.sum())
    return float(loads.max() * loads.shape[0] / total) if total > 0 else float("nan")


def window_balance(counts: np.ndarray, tokens: float, ranks: np.ndarray, num_ranks: int,
                   home: Optional[int]) -> Dict[str, object]:
    """Balance of one gate in one window: counts int64 [3, E_max] (the window's delta), tokens (traffic),
    ranks int64 [E] per expert, home: this process's rank, or None when unknown (then every send counts)."""
    experts = ranks.shape[0]
    loads = rank_loads(counts[ASSIGNED, :experts], ranks, num_ranks)  # [R]
    total = loads.sum()
    reach = counts[RANK_TOKENS, :num_ranks].astype(np.int64)  # [R] tokens that need rank r
    sends = int(reach.sum() - (reach[home] if home is not None else 0))
    return {
        "ep_rank_share": loads / total if total > 0 else np.full(num_ranks, np.nan),
        "ep_load_imbalance": imbalance(loads),
        "alltoall_sends": sends,
        "alltoall_sends_per_token": sends / tokens if tokens > 0 else float("nan"),
    }


def home_rank(options, num_ranks: int) -> Optional[int]:
    """This process's rank when the launcher or ``torch.distributed`` (or ``rank=``) says it and it is
    one of the placement's ranks; else None (a token's home is unknown: every send counts)."""
    import os

    from ..export.rank import process_rank

    known = getattr(options, "rank", None) is not None or any(os.environ.get(v, "").strip() for v in ("RANK",))
    if not known:
        try:
            import torch.distributed as dist

            known = dist.is_available() and dist.is_initialized()
        except Exception:
            known = False
    if not known:
        return None
    rank = process_rank(options).rank
    return rank if 0 <= rank < num_ranks else None


EP_COLUMNS = ["window", "gate", "ep_ranks", "ep_rank_share", "ep_load_imbalance", "alltoall_sends",
              "alltoall_sends_per_token"]


def expert_parallel_frame(windows, gates, placement, home: Optional[int]):
    """One row per (window, gate) of the ring under ``placement`` (columns :data:`EP_COLUMNS`)."""
    import pandas as pd

    from ..hotpath.layout import TOKENS

    rows = []
    if placement is not None:
        for window in windows:
            for i, gate in enumerate(gates):
                stats = window_balance(window.counts[i], float(window.sums[i, TOKENS]), placement.ranks[gate.name],
                                       placement.num_ranks, home)
                rows.append({"window": window.index, "gate": gate.name, "ep_ranks": placement.num_ranks, **stats})
    return pd.DataFrame(rows, columns=EP_COLUMNS)
