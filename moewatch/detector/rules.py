"""Effect sizes that separate *collapse* from *drift*, and the no-baseline absolute rules.

A calibrated check that fires says "this window is not like the baseline". Whether that is a
collapse is a question of how far: these are the distances, in plain numbers.
"""
from __future__ import annotations

# With a baseline (each applies only once the check is significant).
COLLAPSE_EFFECTIVE_RATIO = 0.5  # effective experts at most half the baseline's
OVERLOAD_TOKEN_FRACTION = 0.5  # one expert sees over half of the tokens ...
OVERLOAD_SHARE_RATIO = 3.0  # ... and at least three times its baseline share
DEAD_MIN_EXPECTED = 10.0  # an expert with no assignment where the baseline expects >= 10
SATURATION_LOGIT_RATIO = 2.0  # router-logit std at least twice the baseline's
SATURATION_TOP1_RATIO = 0.5  # probability left outside the top choice at most half the baseline's
COLLAPSE_ENTROPY_RATIO = 0.5  # token routing entropy at most half the baseline's
DROP_COLLAPSE_RATE = 0.01  # drop rate over 1% ...
DROP_COLLAPSE_RATIO = 2.0  # ... and over twice the baseline's 99th percentile
DROP_MIN_EFFECT = 0.001  # drop rate must exceed the baseline's 99th percentile by 0.1 points to count

# Without a baseline (seed thresholds).
STARVED_FRACTION = 0.1  # an expert under 10% of its fair share 1/N
LOW_LOAD_ENTROPY = 0.8  # load entropy under 0.8 ln N: drift ...
COLLAPSED_LOAD_ENTROPY = 0.5  # ... under 0.5 ln N: collapse
TOP_TOKEN_FRACTION = 0.8  # one expert chosen by over 80% of the tokens: collapse
DROP_RATE_LIMIT = 0.01  # over 1% of assignments dropped: collapse
MIN_EXPECTED_PER_EXPERT = 20.0  # load rules need >= 20 assignments per expert on a fair split
MIN_TOKENS = 50  # no rule judges a window of fewer tokens

# Said of the drops a dropless gate reports under capacity_factor=: they are a load signal
# (what a capacity-limited deployment would drop), never by themselves a collapse.
WOULD_BE = " at capacity_factor (the gate is dropless: nothing was dropped)"
