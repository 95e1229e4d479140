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

Where the requests behind the windows are known (a transformers batch's rows, ``Window.rows``,
and the baseline's windows' too), the evidence is also counted in them: a window is judged alone
with ``EVIDENCE_FRACTION`` of a small baseline window's requests, a pool with ``POOL_EVIDENCE``
of them, and looked at for a collapse from ``EARLY_REQUESTS`` of them. That tells a window of a
few long requests from one of many at once, where the pairs of windows (below) tell it only
after the windows that follow; and a pool whose requests were counted needs no confirmation of
a drift (``Pooled.counted``).

A judged window or pool is scored with the baseline's variances scaled by max(1, kappa * n0 / n),
kappa here being the plain ratio of the two dispersions (:func:`.nullmodel.scores`).

Two more things need the live traffic's make-up, which only pairs of windows show:

* right after attach no verdict comes before it is measured (``RECENT_MIN`` pairs): the first
  windows are pooled, and judged by the rule above once it is;
* a window that newly looks like a drift is held (:meth:`Pool.hold`) with the next windows until
  their own pairs, measured around their own shares (:meth:`Pool.own`), say whether they are a
  few heavy requests (pooled on, scored as clustered as they are) or traffic like the
  baseline's (judged together: the drift is reported). A window of two long requests looks
  just like a drift; a changed mix moves every window alike, heavy requests make each window
  unlike the next.
"""
from __future__ import annotations

import collections
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Deque, NamedTuple, Optional

import numpy as np

from ..windows import Window, effective_requests
from .dispersion import LATEST_MIN, RECENT_MIN, RECENT_PAIRS, LiveDispersion, expert_weights, pair_dispersion

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
# Where the requests behind a window are known (the rows of a transformers batch, Window.rows),
# its evidence is counted in them too: judged alone with EVIDENCE_FRACTION of a small baseline
# window's requests, a pool with POOL_EVIDENCE of them, and looked at for a collapse from this
# fraction on (a collapse's effect sizes are far past what a few healthy requests reach together,
# but one request that favours one expert is the whole window).
EARLY_REQUESTS = 0.5
# Standard errors of the baseline's dispersion the live one must exceed before it counts as more
# clustered.
TOLERANCE_SE = 3.0
# Live traffic counts as at most this many times as clustered as the baseline's: a pool never has
# to grow past MAX_KAPPA small baseline windows' worth of assignments.
MAX_KAPPA = 16.0


def joined(a: Window, b: Window) -> Window:
    """Consecutive windows (or pools) ``a`` then ``b`` as one: their sums add up exactly."""
    return dataclasses.replace(b, t_start=a.t_start, sums=a.sums + b.sums, counts=a.counts + b.counts,
                               absmax=np.maximum(a.absmax, b.absmax), rows=a.rows + b.rows)


class OwnMakeup(NamedTuple):
    """How clustered a pool's own windows are (:meth:`Pool.own`), each [G]."""

    dispersion: np.ndarray  # the median of its pairs, scaled as the recent view's; nan below RECENT_MIN pairs
    rough: np.ndarray  # the same from however many pairs there are (nan: none)
    clustered: np.ndarray  # that median past what as many pairs of the baseline's traffic reach
    steady: np.ndarray  # two pairs or more, and every one past what a single baseline pair reaches
    pairs: np.ndarray  # how many pairs


def _no_pairs(gates: int) -> OwnMakeup:
    nan, no = np.full(gates, np.nan), np.zeros(gates, dtype=bool)
    return OwnMakeup(nan, nan, no, no, np.zeros(gates, dtype=np.int64))


@dataclass
class Pooled:
    """A pool ready to be judged."""

    window: Window  # the sum of the pooled windows (index and end of the last one)
    kappa: np.ndarray  # [G] how much more clustered the live traffic is (1 to MAX_KAPPA)
    first: int  # index of the first window in the pool
    count: int  # windows in the pool
    tokens: float  # tokens in the pool (the busiest gate's)
    final: bool = True  # False: an early look (only a collapse is reported; else the pool goes on)
    confirmed: bool = False  # a suspected drift whose windows' make-up has been measured
    # its requests are known, and as many as the calibration supports: its make-up is the
    # baseline's, a drift needs no confirmation
    counted: bool = False


class Pool:
    """Consecutive windows, summed until they carry enough evidence to be judged."""

    def __init__(self, params, top_k: np.ndarray):
        """``params``: the detector's stacked per-gate model (n_floor, dispersion, p, alive [G, ...])."""
        self.n_floor = np.asarray(params["n_floor"], dtype=np.float64)  # [G]
        self.requests_floor = np.asarray(params["requests_floor"], dtype=np.float64)  # [G] nan: not known
        self.top_k = np.maximum(np.asarray(top_k, dtype=np.float64), 1.0)  # [G]
        self.phi0 = np.asarray(params["dispersion"], dtype=np.float64)  # [G]
        self.phi0_bound = self.phi0 * (1.0 + TOLERANCE_SE * np.asarray(params["dispersion_se"], dtype=np.float64))
        # [G, n] the 99.9% quantile of the median of n pairs on traffic like the baseline's,
        # widened as the bound is
        self.recent_hi = np.asarray(params["recent_median_hi"], dtype=np.float64) * (self.phi0_bound / self.phi0)[:, None]
        self.median_ratio = np.asarray(params["dispersion_median_ratio"], dtype=np.float64)
        self.dispersion = LiveDispersion(self.phi0, params["p"], params["alive"],
                                         median_ratio=self.median_ratio)
        self._alive = np.asarray(params["alive"], dtype=bool)  # [G, E]
        # [G, E] each: the counts of the pool's last windows, for its own make-up (own())
        self._recent_counts: Deque[np.ndarray] = collections.deque(maxlen=RECENT_PAIRS + 1)
        self.first = 0
        self.take()  # an empty pool: _window, count, _own, _floor, confirming, _confirmed
        self._needed = self.n_floor  # [G] as of the last window added
        self._requests_short = np.zeros(self.n_floor.size, dtype=bool)  # [G] ... and short of requests

    def kappa(self) -> np.ndarray:
        """[G] how much more clustered the live traffic is than the baseline's (at least 1): the
        factor on the baseline's variances when a pool is scored. The larger of the long-run
        estimate, the recent pairs' median and the pool's own make-up (:meth:`own`): traffic that
        has just become more clustered is scored as it is now."""
        return np.minimum(self.measured_kappa(), MAX_KAPPA)

    def measured_kappa(self) -> np.ndarray:
        """[G] :meth:`kappa` without its upper bound (which bounds how long a pool grows, not
        how clustered traffic can be): what an alarm is judged again with."""
        recent = np.fmax(self.dispersion.recent()[0], self._own_dispersion())
        return np.maximum(np.fmax(self.dispersion.estimate(), recent) / self.phi0, 1.0)

    def own(self) -> OwnMakeup:
        """The pool's own make-up, from the pairs of its last consecutive windows (up to
        ``RECENT_PAIRS``). Scaled and tested as the recent view is, but measured around the
        pool's own expert shares, not the baseline's: a pool of a collapse or of a new mix is as
        clustered as its requests are, and shares far from the baseline's would bias a dispersion
        measured around them."""
        return self._own

    def _own_dispersion(self) -> np.ndarray:
        """[G] the pool's own dispersion where it can be trusted (nan elsewhere): measured on
        ``RECENT_MIN`` pairs; or on fewer, every one of them high (a step into another mix, or
        into a fault, makes one large pair, not two); or that of a confirmed suspect."""
        own = self._own
        rough = np.where(own.steady, own.rough, np.nan)
        return np.fmax(np.fmax(own.dispersion, rough), self._floor)

    def _measure_own(self):
        if len(self._recent_counts) < 2:
            return _no_pairs(self.phi0.size)
        counts = np.stack(self._recent_counts)  # [W, G, E]
        total = counts.sum(0)  # [G, E]
        weights = expert_weights(total, self._alive & (total > 0))  # [G, E]
        pairs, _ = pair_dispersion(counts[:-1], counts[1:], weights[None])  # [W - 1, G]
        pairs = pairs.T  # [G, P]
        n = np.isfinite(pairs).sum(1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan rows: no pair yet
            median = np.nanmedian(pairs, axis=1)
            lowest = np.nanmin(pairs, axis=1)
        hi = np.take_along_axis(self.recent_hi, np.minimum(n, self.recent_hi.shape[1] - 1)[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            clustered = median > hi  # from the first pair on: a pool of a few heavy requests shows at once
            steady = (n >= 2) & (lowest > self.recent_hi[:, 1])
        rough = median / self.median_ratio
        return OwnMakeup(np.where(n >= RECENT_MIN, rough, np.nan), rough, clustered, steady, n)

    def clustered(self) -> np.ndarray:
        """[G] whether the live traffic is measurably more clustered than the baseline's: the
        long-run estimate past the baseline's bound, or the median of the recent pairs past the
        99.9% quantile of the median of as many pairs of the baseline's own (widened as the
        bound is)."""
        _, median, pairs = self.dispersion.recent()
        hi = np.take_along_axis(self.recent_hi, np.minimum(pairs, self.recent_hi.shape[1] - 1)[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            recent = median > hi
            # the last few pairs alone: traffic that has just turned into fewer, longer requests
            # shows in them before it moves the median of all the recent ones
            latest = self.dispersion.latest()  # [G, K] the newest first
            for n in range(LATEST_MIN, latest.shape[1] + 1):
                recent |= np.median(latest[:, :n], axis=1) > self.recent_hi[:, n]
        return (self.dispersion.estimate() > self.phi0_bound) | recent

    def needed(self, evidence: float = POOL_EVIDENCE, alone: Optional[np.ndarray] = None) -> np.ndarray:
        """[G] assignments the pool needs before it is judged (see the module's docstring), or
        before it holds ``evidence`` small baseline windows' worth. ``alone``: :meth:`alone`,
        if already known."""
        # Right after attach nothing is known of the live traffic's make-up, and a window of a
        # few heavy requests is all a collapse looks like: no verdict before it is measured.
        if evidence == POOL_EVIDENCE:
            alone = self.alone() if alone is None else alone
            pooled = np.where(alone, EVIDENCE_FRACTION * self.n_floor, self._needed_by_evidence(evidence))
        else:
            pooled = self._needed_by_evidence(evidence)
        return np.where(self.measured(), pooled, np.inf)

    def alone(self) -> np.ndarray:
        """[G] whether the pool is a single window judged alone: its traffic is not measurably
        more clustered than the baseline's, and it holds as many requests as a small baseline
        window (where they are known)."""
        if self.count > 1:
            return np.zeros(self.phi0.size, dtype=bool)
        return ~self.clustered() & self.has_requests(EVIDENCE_FRACTION)

    def requests(self) -> float:
        """How many requests the pool's tokens are worth (nan: not known; ``Window.requests``)."""
        return np.nan if self._window is None else effective_requests(self._window.rows)

    def requests_known(self) -> np.ndarray:
        """[G] whether the requests of both the pool and the baseline's windows are known."""
        return np.isfinite(self.requests_floor) & np.isfinite(self.requests())

    def has_requests(self, evidence: float) -> np.ndarray:
        """[G] the pool holds ``evidence`` small baseline windows' requests, or they are not known."""
        with np.errstate(invalid="ignore"):
            return ~self.requests_known() | (self.requests() >= evidence * self.requests_floor)

    def measured(self) -> np.ndarray:
        """[G] whether the live traffic's make-up has been measured: ``RECENT_MIN`` pairs of its
        windows, those seen before this pool or this pool's own."""
        return self.dispersion.measured() | (self.own().pairs >= RECENT_MIN)

    def _needed_by_evidence(self, evidence: float) -> np.ndarray:
        upper = np.fmax(np.fmax(self.dispersion.upper(), self.dispersion.recent()[0]), self._own_dispersion())
        return evidence * self.n_floor * np.clip(upper / self.phi0_bound, 1.0, MAX_KAPPA)

    def add(self, window: Window) -> Optional[Pooled]:
        """Add a closed window; returns the pool when it is ready to be judged (and starts anew).

        What is decided for a window (pool or judge, with which kappa) rests on the pairs of the
        windows before it: the pair a window makes with its predecessor is folded in after, so
        the first window of a fault is never judged on the jump the fault itself made."""
        try:
            return self._add(window)
        finally:
            self.dispersion.observe(self._assignments(window))

    def _add(self, window: Window) -> Optional[Pooled]:
        if self._window is None:
            self._window, self.first, self.count = window, window.index, 1
        else:
            self._window = joined(self._window, window)
            self.count += 1
        self._recent_counts.append(self._assignments(window))
        self._own = self._measure_own()
        assignments = self._window.counts[:, 0].sum(-1)  # [G]
        seen = assignments > 0
        if not seen.any():
            return None
        if self.confirming:
            own = self.own()
            if not own.clustered[seen].any():
                if (own.pairs < RECENT_MIN)[seen].any():  # the suspect's make-up is not measured yet
                    return self._pooled(final=False)  # looked at for a collapse after every window
                self.confirming, self._confirmed = False, True
                return self._pooled(final=True)  # as clustered as the baseline's: a drift, judged now
            # more clustered than the baseline's: pooled on, to the evidence its make-up calls for
            # (the suspect is the pool's first window: no step into another mix is among its pairs)
            self.confirming, self._confirmed = False, True
            self._floor = np.where(own.clustered, own.rough, np.nan)
        alone = self.alone()
        self._needed = self.needed(alone=alone)
        # where the requests are known, a pool also needs the requests of its evidence
        self._requests_short = ~(alone | self.has_requests(POOL_EVIDENCE))
        if ((assignments >= self._needed) & ~self._requests_short)[seen].all():
            return self._pooled(final=True)
        early = self.needed(EARLY_EVIDENCE)
        # counted requests measure what the dispersion's factor guards the early look against
        # (a few heavy requests): where they are known, they stand in for it
        early = np.where(self.requests_known() & np.isfinite(early), EARLY_EVIDENCE * self.n_floor, early)
        if ((assignments >= early) & self.has_requests(EARLY_REQUESTS))[seen].all():
            return self._pooled(final=False)
        return None

    def _pooled(self, final: bool) -> Pooled:
        seen = self._window.counts[:, 0].sum(-1) > 0
        counted = bool(final and self.requests_known()[seen].all())
        return Pooled(window=self._window, kappa=self.kappa(), first=self.first, count=self.count,
                      tokens=float(self._window.tokens.max()), final=final, confirmed=self._confirmed,
                      counted=counted)

    def take(self) -> None:
        """Start a new pool (the current one was judged)."""
        self._window: Optional[Window] = None
        self.count = 0
        self._recent_counts.clear()
        self._own = _no_pairs(self.phi0.size)
        self._floor = np.full(self.phi0.size, np.nan)  # [G] a confirmed suspect's own dispersion
        self.confirming = False  # the pool holds a suspected drift, waiting for its make-up
        self._confirmed = False  # ... which has been measured

    def prepend(self, pooled: Pooled) -> None:
        """Put a judged window (or pool) back in front of this pool: its judgement was withdrawn."""
        before = pooled.window
        self._window = joined(before, self._window)
        self.first, self.count = pooled.first, self.count + pooled.count
        if pooled.count == 1 and len(self._recent_counts) < self._recent_counts.maxlen:
            self._recent_counts.appendleft(self._assignments(before))
            self._own = self._measure_own()

    def _assignments(self, window: Window) -> np.ndarray:
        """[G, E] a window's assignments per expert, as the dispersion estimators read them."""
        return np.asarray(window.counts[:, 0, :self.dispersion.weights.shape[1]], dtype=np.float64)

    def hold(self) -> None:
        """The pool just judged shows a new drift: keep it, and judge it again once the pairs of
        its windows (this one and the next ``RECENT_MIN``) have measured its make-up."""
        self.confirming = True

    def windows_to_confirm(self) -> int:
        """While :attr:`confirming`: how many more windows its make-up needs."""
        seen = self._window is not None and self._window.counts[:, 0].sum(-1) > 0
        return int(np.maximum(RECENT_MIN - self.own().pairs, 0)[seen].max(initial=0))

    def settle(self, healthy: np.ndarray) -> None:
        """After a judgement: what the healthy gates [G] saw teaches the live dispersion."""
        self.dispersion.settle(healthy)

    @property
    def window(self) -> Optional[Window]:
        """The windows pooled so far, summed."""
        return self._window

    @property
    def tokens(self) -> float:
        """Tokens waiting in the pool (the busiest gate's)."""
        return 0.0 if self._window is None else float(self._window.tokens.max())

    def tokens_needed(self) -> float:
        """About how many tokens a pool needs (the most demanding gate); infinite while the live
        traffic's make-up is not yet measured (:meth:`windows_to_measure`)."""
        return float((self._needed / self.top_k).max())

    def requests_needed(self) -> float:
        """How many requests the pool needs where it is short of them (0: it is not)."""
        short = self._requests_short & self.requests_known()
        return float((POOL_EVIDENCE * self.requests_floor)[short].max(initial=0.0))

    def windows_to_measure(self) -> int:
        """How many more windows the live traffic's make-up needs before any verdict (0 once
        measured)."""
        d = self.dispersion
        pairs = np.maximum(d.ring_count, self.own().pairs)
        return int(np.maximum(d.recent_min - pairs, 0)[d.seen].max(initial=0))
