"""How clustered routing is: the dispersion of expert shares per assignment, baseline and live.

Tokens of one request route alike, so a window's expert shares vary more between windows than
independent assignments would: ``Var(share_e) = phi * p_e (1 - p_e) / n`` for a window of n
assignments, with a dispersion ``phi`` of 1 for independent assignments and about the number of
assignments per independent unit (a request, or part of one) for clustered traffic. ``n / phi``
is the window's *evidence*: how many independent assignments it is worth.

The baseline's dispersion is measured around its own mean, as its variances are. The live
traffic's is measured from the differences of consecutive windows (von Neumann's successive
differences): for two windows of n_a and n_b assignments with the same mean shares p,

    E[ sum_e (s_a,e - s_b,e)^2 / p_e ] = phi * (E - 1) * (1/n_a + 1/n_b)

whatever their sizes, and neither a live mean that sits a little off the baseline's nor a slow
change of the mix enters a difference of neighbours much.
"""
from __future__ import annotations

import numpy as np

RECENT_PAIRS = 9  # the recent view: the median of this many pairs ...
RECENT_MIN = 3  # ... once there are this many
# The last this many pairs, or more, can also say the traffic is more clustered: a median of three
# is deaf to the one large pair a step into another mix makes, a median of fewer is not.
LATEST_MIN = 3


def expert_weights(p: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """[..., E] 1 / p_e over the experts in use (``p`` renormalised over them), 0 elsewhere."""
    q = np.where(alive, p, 0.0)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-300)
    return np.where(alive, 1.0 / np.where(alive, q, 1.0), 0.0)


def pair_dispersion(a: np.ndarray, b: np.ndarray, weights: np.ndarray):
    """Dispersion estimates from consecutive windows' counts ``a``, ``b`` [..., E].

    ``weights`` [..., E]: :func:`expert_weights` of the expected shares (the baseline's).
    Returns (phi [...], valid [...]): valid where both windows have assignments and at least
    two experts are in use; phi is an unbiased estimate of the dispersion there.
    """
    use = weights > 0
    a, b = a * use, b * use
    na, nb = np.maximum(a.sum(-1), 1e-300), np.maximum(b.sum(-1), 1e-300)
    used = use.sum(-1)
    diff = a / na[..., None] - b / nb[..., None]
    phi = (diff * diff * weights).sum(-1) / (np.maximum(used - 1, 1) * (1.0 / na + 1.0 / nb))
    valid = (na >= 1) & (nb >= 1) & (used >= 2)
    return np.where(valid, phi, np.nan), valid


def baseline_dispersion(counts: np.ndarray, p: np.ndarray, alive: np.ndarray):
    """The dispersion of a gate's baseline windows ``counts`` [W, E], and its relative standard error.

    Measured around the baseline's mean shares ``p`` (each window's Pearson ratio), the way the
    baseline's variances are: a baseline whose mix wanders has larger variances and a larger
    dispersion alike. The standard error says how far the estimate from W windows can be trusted.
    """
    weights = expert_weights(p, alive)  # [E]
    use = weights > 0
    counts = counts * use
    n = counts.sum(-1)  # [W]
    used = int(use.sum())
    keep = n > 0
    if keep.sum() < 2 or used < 2:
        return 1.0, 1.0
    q = np.where(use, 1.0 / np.where(use, weights, 1.0), 0.0)  # the expected shares over the experts in use
    share = counts[keep] / n[keep, None]
    terms = n[keep] * ((share - q) ** 2 * weights).sum(-1) / (used - 1)  # [W] Pearson ratios
    w = terms.size
    phi = float(terms.mean()) * w / (w - 1)  # the mean was estimated from the same windows
    se = float(terms.std(ddof=1) / np.sqrt(w) / max(terms.mean(), 1e-300))
    return max(phi, 1e-9), se


def pair_medians(counts: np.ndarray, p: np.ndarray, alive: np.ndarray, most: int, least: int = 1,
                 level: float = 0.9995, draws: int = 10000, windows: int = 48):
    """How the median of a few pair estimates (:func:`pair_dispersion`) scatters on traffic like
    the baseline's windows ``counts`` [W, E].

    Returns (the median of the baseline's consecutive pairs over their mean; [most + 1] the
    ``level`` quantile of the median of the n pairs of n + 1 consecutive windows, for n =
    ``least``..``most``, infinite below). Pair estimates are skewed and heavy-tailed for clustered traffic (a window that
    holds a heavy request makes both of its pairs large), so the quantiles are a bootstrap of
    that very statistic: sequences of n + 1 windows drawn from the baseline's own (at most
    ``windows`` of them, every pair of which is computed once).
    """
    weights = expert_weights(p, alive)
    phi, valid = pair_dispersion(counts[:-1], counts[1:], weights)
    phi = phi[valid]
    out = np.full(most + 1, np.inf)  # too few windows to say: never "more clustered" by them
    if phi.size < 4 or phi.mean() <= 0:
        return 1.0, out
    rng = np.random.default_rng(0)
    if counts.shape[0] > windows:
        counts = counts[rng.choice(counts.shape[0], windows, replace=False)]
    w = counts.shape[0]
    step = max(1, (1 << 21) // max(w * counts.shape[1], 1))  # rows per block: ~16 MB of float64
    table = np.concatenate([pair_dispersion(counts[i:i + step, None], counts[None], weights)[0]
                            for i in range(0, w, step)])  # [W, W]
    np.fill_diagonal(table, np.nan)  # a window is not paired with itself
    seq = rng.integers(0, w, size=(draws, most + 1))
    pairs = table[seq[:, :-1], seq[:, 1:]]  # [draws, most]: the first n of them for n pairs
    pairs = pairs[np.isfinite(pairs).all(1)]
    for n in range(max(least, 1), most + 1):
        med = np.sort(pairs[:, :n], axis=1)
        out[n] = np.quantile(0.5 * (med[:, (n - 1) // 2] + med[:, n // 2]), level)
    return float(np.clip(np.median(phi) / phi.mean(), 0.25, 1.0)), out


class LiveDispersion:
    """The live traffic's dispersion per gate, learned from consecutive windows.

    Two views of the same pairs, each an exponentially weighted mean over about ``memory`` of
    them:

    * :meth:`estimate` starts from the baseline's dispersion, worth ``prior`` pairs: until live
      traffic shows otherwise, it is taken to be like the baseline's;
    * :meth:`upper` is an upper confidence bound from the live pairs alone: with few of them it
      is large (pair estimates are heavy-tailed), so it stays cautious until there is data.

    Pairs are folded in as windows arrive, provisionally, and kept only for gates the detector
    then judged healthy: a fault never teaches the detector that routing is noisier than it is
    (which would make it wait longer, and score more leniently, just when a fault begins). Both
    views therefore use the kept pairs only, except that :meth:`upper` also counts the pending
    ones while fewer than ``warmup`` pairs are kept: right after attach, the first small windows
    are all there is to learn from. One pair counts at most ``clip`` times the estimate: a single
    abrupt change between two windows cannot move it far.

    A third view, :meth:`recent`, follows the traffic as it is now: the median of the last
    ``recent_pairs`` pairs of consecutive windows, whatever their verdict, except a pair that
    spans two judgements that disagree (scaled by the median's ratio to the mean on the
    baseline's own pairs). The kept views cannot follow a change of
    make-up that the detector misjudges (windows of a few long requests scored as if they were
    the baseline's many short ones alarm, so their pairs would never be kept, and they would go
    on alarming); the recent view can. The step into a fault and the step out are left out
    (and a median is deaf to the few that slip through); the pairs within a fault route about
    as alike as healthy ones (the whole window moves, not its spread). The detector uses this view only in
    the cautious direction: to pool windows rather than judge them alone, and to widen the
    variances it scores with.
    """

    def __init__(self, phi0: np.ndarray, p: np.ndarray, alive: np.ndarray, memory: float = 1024.0,
                 prior: float = 64.0, clip: float = 10.0, warmup: float = 16.0, median_ratio=1.0,
                 recent_pairs: int = RECENT_PAIRS, recent_min: int = RECENT_MIN):
        self.phi0 = np.asarray(phi0, dtype=np.float64)  # [G]
        self.weights = expert_weights(p, alive)  # [G, E]
        self.decay = 1.0 - 1.0 / memory
        self.clip, self.warmup = clip, warmup
        zero = np.zeros_like(self.phi0)
        # [G] each: the prior's weight, then the live pairs' weighted sum, sum of squares and
        # weight; as kept after the last judgement, and with the pairs since then
        self.kept = (np.full_like(self.phi0, prior), zero, zero, zero)
        self.now = self.kept
        # the recent view: [G, recent_pairs] the last pairs of each gate (a ring), how many it holds
        self.ring = np.full((self.phi0.size, recent_pairs), np.nan)
        self.ring_count = np.zeros(self.phi0.shape, dtype=np.int64)
        self.recent_min = recent_min
        # the first pair since the last judgement spans two of them: [G] its value, whether there
        # is one; it joins the ring only where both judgements agree (not the step into a fault
        # or out of one)
        self.spanning = (np.zeros(self.phi0.shape), np.zeros(self.phi0.shape, dtype=bool))
        self.judged_healthy = np.ones(self.phi0.shape, dtype=bool)  # [G] the last judgement
        self.median_ratio = np.broadcast_to(np.asarray(median_ratio, dtype=np.float64), self.phi0.shape)
        self._recent = None  # recent(), as of the last pair
        self.last = np.zeros(self.weights.shape)  # [G, E] counts of the last window with assignments
        self.has_last = np.zeros(self.phi0.shape, dtype=bool)  # ... and it may pair for the kept views
        self.seen = np.zeros(self.phi0.shape, dtype=bool)  # ... and there is one
        self.judged_once = False  # before the first judgement no pair spans two of them

    def estimate(self) -> np.ndarray:
        """[G] the dispersion: the baseline's, replaced by the live traffic's as pairs are kept."""
        prior, total, _, weight = self.kept
        return (prior * self.phi0 + total) / (prior + weight)

    def upper(self, z: float = 2.0) -> np.ndarray:
        """[G] ``z`` standard errors over the live pairs' mean (infinite before two pairs), and
        never below :meth:`estimate`."""
        warming = self.kept[3] < self.warmup
        _, total, squares, weight = (np.where(warming, now, kept) for now, kept in zip(self.now, self.kept))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / weight
            sd = np.sqrt(np.maximum(squares / weight - mean ** 2, 0.0))
            bound = np.where(weight >= 2.0, mean + z * sd / np.sqrt(weight), np.inf)
        return np.maximum(bound, self.estimate())

    def recent(self):
        """([G] the dispersion of the last pairs, nan with fewer than ``recent_min`` of them;
        [G] their median, unscaled; [G] how many pairs it rests on)."""
        if self._recent is None:
            pairs = np.minimum(self.ring_count, self.ring.shape[1])
            ordered = np.sort(self.ring, axis=1)  # [G, K] the empty slots (nan) last
            rows = np.arange(pairs.size)
            k = np.maximum(pairs, 1)
            median = 0.5 * (ordered[rows, (k - 1) // 2] + ordered[rows, k // 2])
            median = np.where(pairs >= self.recent_min, median, np.nan)
            self._recent = (median / self.median_ratio, median, pairs)
        return self._recent

    def latest(self) -> np.ndarray:
        """[G, recent_pairs] the recent view's pairs, the newest first (nan where there are fewer)."""
        k = self.ring.shape[1]
        back = np.arange(k)  # [K]
        idx = (self.ring_count[:, None] - 1 - back[None]) % k  # [G, K]
        out = np.take_along_axis(self.ring, idx, 1)
        return np.where(back[None] < np.minimum(self.ring_count, k)[:, None], out, np.nan)

    def measured(self) -> np.ndarray:
        """[G] whether the live traffic's make-up has been measured at all: the recent view rests
        on at least ``recent_min`` pairs of its windows."""
        return self.ring_count >= self.recent_min

    def observe(self, counts: np.ndarray) -> None:
        """A window's assignment counts [G, E]: fold in its pair with the previous window."""
        counts = np.asarray(counts, dtype=np.float64)
        phi, valid = pair_dispersion(self.last, counts, self.weights)
        valid &= self.seen
        phi = np.minimum(np.nan_to_num(phi), self.clip * self.estimate())
        first = valid & ~self.spanning[1] & self.judged_once
        self.spanning = (np.where(first, phi, self.spanning[0]), self.spanning[1] | first)
        self._ring(phi, valid & ~first)
        valid &= self.has_last
        d = self.decay
        prior, total, squares, weight = self.now
        self.now = tuple(np.where(valid, new, old) for new, old in zip(
            (d * prior, d * total + phi, d * squares + phi * phi, d * weight + 1.0), self.now))
        seen = counts.sum(-1) > 0
        self.last = np.where(seen[:, None], counts, self.last)
        self.has_last |= seen
        self.seen |= seen

    def _ring(self, phi: np.ndarray, valid: np.ndarray) -> None:
        self._recent = None
        slot = self.ring_count % self.ring.shape[1]
        rows = np.flatnonzero(valid)
        self.ring[rows, slot[rows]] = phi[rows]
        self.ring_count += valid

    def settle(self, healthy: np.ndarray) -> None:
        """After a judgement: keep the pairs since the last one for ``healthy`` gates [G] only (the
        recent view keeps them all, and the pair that spans two judgements where they agree)."""
        self.kept = tuple(np.where(healthy, now, kept) for now, kept in zip(self.now, self.kept))
        self.now = self.kept
        healthy = np.asarray(healthy, dtype=bool)
        phi, valid = self.spanning
        self._ring(phi, valid & (healthy == self.judged_healthy))
        self.spanning = (np.zeros_like(phi), np.zeros_like(valid))
        self.judged_healthy = healthy.copy()
        self.judged_once = True
        self.has_last &= healthy  # nor does the step from an alarmed window to the next one
