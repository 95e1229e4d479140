"""The accumulator layout every backend of the hot path writes and every reader reads.

Per device, cumulative tensors (never reset by the hot path; windows are differences):

- ``sums``   float64 [G, NUM_SCALARS + E_max]: per gate, the scalar sums below, then the sum of
  router probabilities per expert.
- ``counts`` int64 [G, COUNT_ROWS, E_max]: per gate, assignments per expert (row ``ASSIGNED``),
  dropped assignments per expert (``DROPPED``), and, with an expert placement, per rank r < R the
  traffic tokens that chose at least one expert placed on rank r (``RANK_TOKENS``; the column is
  the rank, R <= E; zeros without a placement). The sum of that row over ranks is the all-to-all
  volume of those tokens when each is sent to every rank that holds one of its experts.
- ``absmax`` float64 [G]: max |logit| since the window closed last (a max has no difference).
- ``cosel``  int64 [G, E_max, E_max]: co-selection. For i < j, ``[i, j]`` counts the traffic tokens
  whose chosen experts include both i and j; ``[i, i]`` the traffic tokens that chose i (each
  token once, however many of its slots name i); below the diagonal stays 0 (the matrix is
  symmetric: :func:`symmetric` fills it in). Read by the reader at a coarser cadence than windows.
- ``ranks``  int64 [G, E_max]: the rank each expert is placed on (-1: no placement); set once at
  attach, read by the hot path.
"""
from __future__ import annotations

import numpy as np

# The widest gate the Triton kernel takes (tiles of E padded to a power of two); wider gates take
# the torch reference on the device.
FUSED_MAX_EXPERTS = 256

# Columns of the per-gate float64 sums (followed by E columns of router-probability sums).
TOKENS, ENTROPY, LOGIT_SUM, LOGIT_SQSUM, LOGIT_FINITE, TOP1, MARGIN, ZLOSS, NONFINITE = range(9)
SCALAR_NAMES = (
    "tokens", "entropy_sum", "logit_sum", "logit_sqsum", "logit_finite",
    "top1_sum", "margin_sum", "zloss_sum", "nonfinite",
)
NUM_SCALARS = len(SCALAR_NAMES)

# Rows of the per-gate int64 counts.
ASSIGNED, DROPPED, RANK_TOKENS = range(3)
COUNT_ROWS = 3

# Scoring functions, as the op's integer argument.
SOFTMAX, SIGMOID = 0, 1
SCORING_CODES = {"softmax": SOFTMAX, "sigmoid": SIGMOID}


def symmetric(upper: np.ndarray) -> np.ndarray:
    """The full co-selection matrix [..., E, E] from the stored upper triangle (diagonal included)."""
    upper = np.triu(upper)
    return upper + np.swapaxes(upper, -1, -2) - upper * np.eye(upper.shape[-1], dtype=upper.dtype)
