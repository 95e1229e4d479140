"""Per-call routing statistics: the layout and the readable reference, re-exported.

The hot path lives in :mod:`moewatch.hotpath`; this module keeps the names other parts import.
"""
from .hotpath.layout import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, MARGIN,  # noqa: F401
                             NONFINITE, NUM_SCALARS, SCALAR_NAMES, TOKENS, TOP1, ZLOSS)
from .hotpath.reference import gate_sums, routing_probs, would_be_drops  # noqa: F401
