"""The accumulator layout every backend of the hot path writes and every reader reads.

Per device, three cumulative tensors (never reset by the hot path; windows are differences):

- ``sums``   float64 [G, NUM_SCALARS + E_max]: per gate, the scalar sums below, then the sum of
  router probabilities per expert.
- ``counts`` int64 [G, 2, E_max]: per gate, assignments per expert, dropped assignments per expert.
- ``absmax`` float64 [G]: max |logit| since the window closed last (a max has no difference).
"""
from __future__ import annotations

# Columns of the per-gate float64 sums (followed by E columns of router-probability sums).
TOKENS, ENTROPY, LOGIT_SUM, LOGIT_SQSUM, LOGIT_FINITE, TOP1, MARGIN, ZLOSS, NONFINITE = range(9)
SCALAR_NAMES = (
    "tokens", "entropy_sum", "logit_sum", "logit_sqsum", "logit_finite",
    "top1_sum", "margin_sum", "zloss_sum", "nonfinite",
)
NUM_SCALARS = len(SCALAR_NAMES)

# Scoring functions, as the op's integer argument.
SOFTMAX, SIGMOID = 0, 1
SCORING_CODES = {"softmax": SOFTMAX, "sigmoid": SIGMOID}
