"""The evidence rule: never judge on less evidence than the calibration supports.

The calibration (:mod:`.calibrate`) measured how the scores of the *baseline's* windows are
distributed: windows of about n0 assignments, of traffic as clustered as the baseline's
(dispersion phi0, :mod:`.dispersion`), each worth about n0 / phi0 independent assignments. A
live window worth much less is a different statistical object, not a noisier copy of one: a
window of one or two requests is dominated by what those requests happen to be about, its
statistics are skewed and biased (a request favours a few experts, so a window of one looks
concentrated), and no scaling of the baseline's variances describes it. Judged alone, such
windows page on healthy traffic.

A window is judged alone, at once, when its traffic is not measurably more clustered than the
baseline's (the live dispersion is within ``TOLERANCE_SE`` standard errors of the baseline's
estimate of its own) and every gate with traffic has

    assignments >= EVIDENCE_FRACTION * n_floor

n_floor being the assignments of a small baseline window (the ``EVIDENCE_QUANTILE`` of them).
That is the usual case at the baseline's window size, and nothing changes there; the fraction
lets windows a little smaller than the baseline's pass, the scaling of the variances (below)
covering the difference.

Any other window starts a pool: consecutive windows are summed (their sums add up exactly: a
pool is the window the monitor would have closed had it waited) until every gate with traffic
has

    assignments >= POOL_EVIDENCE * n_floor * kappa

kappa (at least 1) being how much more clustered the live traffic is than the baseline's, from
an upper bound of the live dispersion (cautious right after attach, when it rests on a few
pairs). Traffic more clustered than the baseline's (longer requests route alike for longer) is
pooled even when its windows are as large as the baseline's: a window of four long requests
holds fewer, heavier units than a baseline window of sixteen short ones, with heavier tails at
the same variance. A pool can afford the margin a window of the baseline's size cannot: at low
traffic verdicts wait anyway, and on the trained router model, pools and windows of about one
baseline window's evidence of held-out requests still paged about once in 10,000 verdicts, twice
that evidence never did (docs/detection.md, "Traffic shapes").

One thing does not wait for the margin: once a pool holds ``EARLY_EVIDENCE`` small baseline
windows' worth, it is looked at after every window, and a *collapse* (a significant change that
is also past the collapse effect sizes: half the effective experts, a dead expert, logits twice
as spread, ...) is reported at once. Healthy traffic with a baseline window's evidence never
came near those effect sizes; what the margin guards against are drift-sized excursions.

A judged window or pool is scored with the baseline's variances scaled by max(1, kappa * n0 / n),
kappa here being the plain ratio of the two dispersions (:func:`.nullmodel.scores`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..windows import Window
from .dispersion import LiveDispersion

# The evidence of a baseline window is that of its smaller ones (this quantile of their
# assignments): the calibration scored them all, and live windows closed by the same rule are as
# often smaller than the median as larger.
EVIDENCE_QUANTILE = 0.1
# A window of traffic like the baseline's is judged alone when it holds this fraction of a small
# baseline window's assignments ...
EVIDENCE_FRACTION = 0.8
# ... and a pool of smaller windows once it holds this many small baseline windows' evidence;
POOL_EVIDENCE = 2.0
# from this many on, a pool is looked at for a collapse after every window.
EARLY_EVIDENCE = 1.0
# Standard errors of the baseline's dispersion the live one must exceed before it counts as more
# clustered.
TOLERANCE_SE = 3.0
# Live traffic counts as at most this many times as clustered as the baseline's: a pool never has
# to grow past MAX_KAPPA small baseline windows' worth of assignments.
MAX_KAPPA = 16.0


@dataclass
class Pooled:
    """A pool ready to be judged."""

    window: Window  # the sum of the pooled windows (index and end of the last one)
    kappa: np.ndarray  # [G] how much more clustered the live traffic is (1 to MAX_KAPPA)
    first: int  # index of the first window in the pool
    count: int  # windows in the pool
    tokens: float  # tokens in the pool (the busiest gate's)
    final: bool = True  # False: an early look (only a collapse is reported; else the pool goes on)


class Pool:
    """Consecutive windows, summed until they carry enough evidence to be judged."""

    def __init__(self, params, top_k: np.ndarray):
        """``params``: the detector's stacked per-gate model (n_floor, dispersion, p, alive [G, ...])."""
        self.n_floor = np.asarray(params["n_floor"], dtype=np.float64)  # [G]
        self.top_k = np.maximum(np.asarray(top_k, dtype=np.float64), 1.0)  # [G]
        self.phi0 = np.asarray(params["dispersion"], dtype=np.float64)  # [G]
        self.phi0_bound = self.phi0 * (1.0 + TOLERANCE_SE * np.asarray(params["dispersion_se"], dtype=np.float64))
        # [G, n] the 99.9% quantile of the median of n pairs on traffic like the baseline's,
        # widened as the bound is
        self.recent_hi = np.asarray(params["recent_median_hi"], dtype=np.float64) * (self.phi0_bound / self.phi0)[:, None]
        self.median_ratio = np.asarray(params["dispersion_median_ratio"], dtype=np.float64)
        self.dispersion = LiveDispersion(self.phi0, params["p"], params["alive"],
                                         median_ratio=self.median_ratio)
        self._window: Optional[Window] = None
        self.first = 0
        self.count = 0
        self._needed = self.n_floor  # [G] as of the last window added

    def kappa(self) -> np.ndarray:
        """[G] how much more clustered the live traffic is than the baseline's (at least 1): the
        factor on the baseline's variances when a pool is scored. The larger of the long-run
        estimate and the recent pairs' median: traffic that has just become more clustered is
        scored as it is now."""
        recent = np.nan_to_num(self.dispersion.recent()[0])
        return np.clip(np.maximum(self.dispersion.estimate(), recent) / self.phi0, 1.0, MAX_KAPPA)

    def clustered(self) -> np.ndarray:
        """[G] whether the live traffic is measurably more clustered than the baseline's: the
        long-run estimate past the baseline's bound, or the median of the recent pairs past the
        99.9% quantile of the median of as many pairs of the baseline's own (widened as the
        bound is)."""
        _, median, pairs = self.dispersion.recent()
        hi = np.take_along_axis(self.recent_hi, np.minimum(pairs, self.recent_hi.shape[1] - 1)[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            recent = median > hi
        return (self.dispersion.estimate() > self.phi0_bound) | recent

    def needed(self, evidence: float = POOL_EVIDENCE) -> np.ndarray:
        """[G] assignments the pool needs before it is judged (see the module's docstring), or
        before it holds ``evidence`` small baseline windows' worth."""
        upper = np.maximum(self.dispersion.upper(), np.nan_to_num(self.dispersion.recent()[0]))
        pooled = evidence * self.n_floor * np.clip(upper / self.phi0_bound, 1.0, MAX_KAPPA)
        if self.count > 1 or evidence != POOL_EVIDENCE:
            return pooled
        # one window, of traffic not measurably more clustered than the baseline's: judged alone
        return np.where(self.clustered(), pooled, EVIDENCE_FRACTION * self.n_floor)

    def add(self, window: Window) -> Optional[Pooled]:
        """Add a closed window; returns the pool when it is ready to be judged (and starts anew).

        What is decided for a window (pool or judge, with which kappa) rests on the pairs of the
        windows before it: the pair a window makes with its predecessor is folded in after, so
        the first window of a fault is never judged on the jump the fault itself made."""
        try:
            return self._add(window)
        finally:
            self.dispersion.observe(window.counts[:, 0, :self.dispersion.weights.shape[1]])

    def _add(self, window: Window) -> Optional[Pooled]:
        if self._window is None:
            self._window, self.first, self.count = window, window.index, 1
        else:
            w = self._window
            self._window = dataclasses.replace(w, index=window.index, t_end=window.t_end,
                                               sums=w.sums + window.sums, counts=w.counts + window.counts,
                                               absmax=np.maximum(w.absmax, window.absmax))
            self.count += 1
        assignments = self._window.counts[:, 0].sum(-1)  # [G]
        seen = assignments > 0
        if not seen.any():
            return None
        self._needed = self.needed()
        if (assignments >= self._needed)[seen].all():
            pooled = self._pooled(final=True)
            self.take()
            return pooled
        if (assignments >= self.needed(EARLY_EVIDENCE))[seen].all():
            return self._pooled(final=False)
        return None

    def _pooled(self, final: bool) -> Pooled:
        return Pooled(window=self._window, kappa=self.kappa(), first=self.first, count=self.count,
                      tokens=float(self._window.tokens.max()), final=final)

    def take(self) -> None:
        """Start a new pool (the current one was judged)."""
        self._window, self.count = None, 0

    def settle(self, healthy: np.ndarray) -> None:
        """After a judgement: what the healthy gates [G] saw teaches the live dispersion."""
        self.dispersion.settle(healthy)

    @property
    def tokens(self) -> float:
        """Tokens waiting in the pool (the busiest gate's)."""
        return 0.0 if self._window is None else float(self._window.tokens.max())

    def tokens_needed(self) -> float:
        """About how many tokens a pool needs (the most demanding gate)."""
        return float((self._needed / self.top_k).max())
