"""The healthy-routing model of one gate, fitted to its baseline windows, and the window scores.

Each check turns a window into a *score* on the scale of a standard normal upper tail: under
healthy traffic (as the baseline saw it) ``P(score > h) ~= Phi(-h)``. The calibration
(:mod:`.calibrate`) then corrects what this approximation gets wrong, from the baseline's own
windows.

Variances are taken at the baseline's typical window size n0 and inflated by ``kappa * n0 / n``
for smaller windows, where ``kappa`` (at least 1) is how much more clustered the live traffic is
than the baseline's (:mod:`.dispersion`): the excess dispersion of real traffic may come from
correlated tokens (which scales like 1/n) or from a changing mix (which does not), and we cannot
tell them apart, so we assume whichever is larger at each window size. This extrapolation is
only trusted over a short range: windows that carry much less evidence than a baseline window
are pooled before they are scored (:mod:`.pooling`).

Scalar statistics are not normal: the effective number of experts is a quadratic in the shares
(its low tail falls like a chi-square's), a drop rate is an overflow past a capacity (mostly
small, now and then a burst). A normal fitted to their bulk puts a 1-in-10^7 window at 5 sd
where the real one lies at 8-10. Each is therefore scored on a Pearson type III (a shifted
gamma) with the baseline's mean, standard deviation and skewness, whose exponential tail is
what such statistics have; with no skewness it is the normal.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from scipy import special

from ..baseline import requests_counted
from .dispersion import RECENT_PAIRS, baseline_dispersion, pair_medians
from .features import Features
from .pooling import EVIDENCE_QUANTILE

CHECKS = ("load", "overload", "underload", "concentration", "logit_std", "top1_prob", "entropy", "drop_rate")
LOAD, OVERLOAD, UNDERLOAD, CONCENTRATION, LOGIT_STD, TOP1_PROB, ENTROPY, DROP_RATE = range(len(CHECKS))
# (feature, sides): two-sided checks alarm on a change either way; collapse rules look at one side.
SCALARS = {CONCENTRATION: ("effective", "low"), LOGIT_STD: ("logit_std", "both"),
           TOP1_PROB: ("top1", "both"), ENTROPY: ("entropy", "both"), DROP_RATE: ("drop_rate", "high")}

_SIDE_LOW = np.array([sides == "low" for _, sides in SCALARS.values()])
_SIDE_HIGH = np.array([sides == "high" for _, sides in SCALARS.values()])
_PER_ASSIGNMENT = ("effective", "drop_rate")  # per assignment; the other scalars per token
_LOAD_CHECKS = [LOAD, OVERLOAD, UNDERLOAD, CONCENTRATION]  # what the experts' shares say

Params = Dict[str, np.ndarray]
MIN_EXPECTED = 5.0  # expected assignments below which an expert's share is not tested
MAX_SKEW = 4.0  # |skewness| of a scalar statistic is taken at most this
MIN_SKEW = 1e-3  # |skewness| below this: normal tails on both sides


def _moments(x: np.ndarray, floor: float) -> tuple:
    """Median, mean, standard deviation and skewness of the finite values of ``x``.

    The skewness is the adjusted Fisher-Pearson one (G1), clipped to +-MAX_SKEW; the median
    is kept for the reasons and the collapse rules (a typical baseline value).
    """
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan, np.inf, 0.0
    med, mu = float(np.median(x)), float(np.mean(x))
    sd = float(np.std(x))
    n = x.size
    if n > 2 and sd > 0:
        g1 = float(np.mean((x - mu) ** 3)) / sd ** 3
        g = float(np.clip(g1 * np.sqrt(n * (n - 1)) / (n - 2), -MAX_SKEW, MAX_SKEW))
    else:
        g = 0.0
    sd = sd * np.sqrt(n / (n - 1)) if n > 1 else sd
    return med, mu, max(sd, floor, 1e-3 * abs(med), 1e-9), g


def _skewed_tails(y: np.ndarray, g: np.ndarray) -> tuple:
    """(P(Y > y), P(Y < y)) for a standardised variable Y of skewness ``g`` (Pearson type III).

    The heavy side (the side the skew points to) is a shifted gamma with the same mean, variance
    and skewness; its tail falls like exp(-y), far slower than a normal one, which is what
    statistics such as the effective number of experts (a quadratic in the shares) or a drop
    rate (an overflow past a capacity) do. The light side of a gamma is bounded; there the
    normal tail is used instead, so no healthy value can ever lie "beyond the bound".
    """
    skewed = np.abs(g) >= MIN_SKEW
    g = np.where(skewed, g, MIN_SKEW)
    a = 4.0 / (g * g)
    t = np.maximum(a + np.sign(g) * y * np.sqrt(a), 0.0)
    heavy = special.gammaincc(a, t)  # P(further out on the heavy side)
    hi = np.where(skewed & (g > 0), heavy, special.ndtr(-y))
    lo = np.where(skewed & (g < 0), heavy, special.ndtr(y))
    return hi, lo


def fit(f: Features, evidence: bool = True) -> Params:
    """Fit the healthy model to baseline windows ``f`` ([W] windows, [W, E] counts).

    ``evidence=False`` leaves out what only the evidence rule needs (the calibration's
    out-of-sample fits score windows and never pool them)."""
    counts = f.counts
    total = counts.sum(0)  # [E]
    grand = max(float(total.sum()), 1.0)
    alive = total > 0
    # Experts the baseline never saw get a tiny share, so a later window that uses them scores high.
    p = np.maximum(total / grand, 0.5 / grand)
    n0 = float(np.median(f.assignments))
    t0 = float(np.median(f.tokens))
    sampling = p * (1 - p) / n0
    if counts.shape[0] > 1:
        # Over-dispersion common to all experts (Pearson), then each expert's own between-window
        # variance; blend the two so one noisy estimate cannot dominate.
        used = max(int(alive.sum()) - 1, 1)
        pearson = (((f.share - p) ** 2 / p)[:, alive].sum(1) / used)
        rho = max(0.0, float(np.mean(pearson - 1.0 / np.maximum(f.assignments, 1))))
        pooled = p * (1 - p) * (1.0 / n0 + rho)
        own = f.share.var(0, ddof=1)
        var = np.maximum(sampling, 0.5 * own + 0.5 * pooled)
    else:
        var = sampling
    params: Params = {"p": p, "alive": alive, "var": var, "n0": np.float64(n0), "t0": np.float64(t0),
                      "phi": np.float64(1.0),
                      # every token chose every expert in every window (top-k = E): the load is set
                      # by the gate's shape, not by its routing, and says nothing of it (its baseline
                      # spread is 0, so any window size alarmed on it)
                      "load_fixed": np.float64(counts.size > 0 and bool(np.all(counts == f.tokens[:, None]))),
                      # the evidence rule (pooling.py): a small baseline window's assignments, and how
                      # clustered the baseline's traffic is (with the relative standard error of that)
                      "n_floor": np.float64(np.quantile(f.assignments, EVIDENCE_QUANTILE)),
                      # ... and the requests of a small baseline window (nan: the baseline's are not known)
                      "requests_floor": np.float64(np.quantile(f.requests, EVIDENCE_QUANTILE)
                                                   if requests_counted(f.requests) else np.nan)}
    params["dispersion"], params["dispersion_se"] = map(np.float64, baseline_dispersion(counts, p, alive))
    # how the median of a few live pairs may scatter on traffic like the baseline's
    ratio, quantiles = (pair_medians(counts, p, alive, RECENT_PAIRS, 1) if evidence
                        else (1.0, np.full(RECENT_PAIRS + 1, np.inf)))
    params["dispersion_median_ratio"] = np.float64(ratio)
    params["recent_median_hi"] = quantiles  # [RECENT_PAIRS + 1]
    rate = max(float(np.nanmean(f.drop_rate)) if np.isfinite(f.drop_rate).any() else 0.0, 1.0 / grand)
    floors = {"effective": 0.0, "logit_std": 0.0, "top1": 0.0, "entropy": 0.0,
              "drop_rate": float(np.sqrt(rate * (1 - rate) / n0))}
    for feature, _ in SCALARS.values():
        med, mu, sd, g = _moments(getattr(f, feature), floors[feature])
        for key, value in (("m", med), ("mu", mu), ("s", sd), ("g", g)):
            params[f"{feature}_{key}"] = np.float64(value)
    # the same, stacked in the order of SCALARS, for scores() ([S] each)
    for key in ("mu", "s", "g"):
        params[f"scalar_{key}"] = np.array([params[f"{feat}_{key}"] for feat, _ in SCALARS.values()])
    params["scalar_n0"] = np.array([n0 if feat in _PER_ASSIGNMENT else t0 for feat, _ in SCALARS.values()])
    drops = f.drop_rate[np.isfinite(f.drop_rate)]
    params["drop_rate_hi"] = np.float64(np.quantile(drops, 0.99) if drops.size else 0.0)
    nonfinite_rate = f.nonfinite / np.maximum(f.tokens, 1)
    params["nonfinite_rate_max"] = np.float64(np.nanmax(nonfinite_rate) if nonfinite_rate.size else 0.0)
    return params


def expert_z(params: Params, f: Features, kappa=1.0) -> np.ndarray:
    """Per-expert standardised share deviation [..., E] (0 for experts the baseline never used).

    ``kappa`` [...]: how much more clustered the window's traffic is than the baseline's.

    An expert's share across windows is skewed like a gamma variable (a small share cannot go
    below 0 but can jump up), so a plain (s - p) / sd has a long upper tail. The cube root
    (Wilson-Hilferty) of s / p, with the gamma shape a = p^2 / var, is close to normal.
    """
    inflate = np.maximum(1.0, kappa * params["n0"] / np.maximum(f.assignments, 1.0))[..., None]
    shape = params["p"] ** 2 / (params["var"] * inflate)  # [..., E]
    c = 1.0 / (9.0 * shape)
    z = (np.cbrt(f.share / params["p"]) - (1 - c)) / np.sqrt(c)
    return np.where(tested(params, f), z, 0.0)


def tested(params: Params, f: Features) -> np.ndarray:
    """[..., E] experts a window can say something about: used in the baseline, and expected
    to receive at least MIN_EXPECTED assignments in this window (the normal approximation of
    a share fails below that, and a handful of tokens must never look like a collapse)."""
    return params["alive"] & (f.assignments[..., None] * params["p"] >= MIN_EXPECTED)


def _tail_score(p: np.ndarray) -> np.ndarray:
    """Normal-scale score of an upper-tail probability p (p = Phi(-score))."""
    return -special.ndtri(np.clip(p, 0.0, 1.0))


def scores(params: Params, f: Features, raw_load: bool = False, kappa=1.0) -> np.ndarray:
    """Scores [..., K] of windows ``f`` against ``params`` (columns: :data:`CHECKS`).

    ``kappa`` [...] (at least 1): the live traffic's dispersion over the baseline's; a window's
    variances are the baseline's times max(1, kappa * n0 / n).

    With ``raw_load`` the load column holds the dispersion statistic D / df before scaling by
    the fitted dispersion (the calibration estimates that scale from these).
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    z = expert_z(params, f, kappa)  # [..., E]
    alive = tested(params, f)  # [..., E]
    n_alive = alive.sum(-1).astype(np.float64)
    out = np.empty(f.tokens.shape + (len(CHECKS),))
    # Load divergence: dispersion-adjusted Pearson statistic, to a normal score (Wilson-Hilferty).
    df = np.maximum(n_alive - 1, 1)
    ratio = np.where(n_alive >= 2, (z ** 2).sum(-1) / df, np.nan)
    if raw_load:
        out[..., LOAD] = ratio
    else:
        ratio = ratio / params["phi"]
        c = 2.0 / (9.0 * df)
        out[..., LOAD] = (np.cbrt(ratio) - (1 - c)) / np.sqrt(c)
    # Over/under-loaded experts: the most extreme expert, Bonferroni over the experts in use.
    zmax = np.where(alive, z, -np.inf).max(-1)
    zmin = np.where(alive, z, np.inf).min(-1)
    none = np.where(n_alive > 0, 1.0, np.nan)  # no expert tested: no score
    out[..., OVERLOAD] = _tail_score(n_alive * special.ndtr(-zmax) * none)
    out[..., UNDERLOAD] = _tail_score(n_alive * special.ndtr(zmin) * none)
    # Too few assignments for the load of this gate to mean anything (~MIN_EXPECTED per expert).
    thin = f.assignments < MIN_EXPECTED * np.maximum(params["alive"].sum(-1), 1)
    # The scalar checks, all at once ([..., S]): a smaller window is a sum of fewer parts, with
    # more variance (kappa n0 / n) and more skewness (its square root).
    cols = list(SCALARS)
    x = np.stack([getattr(f, SCALARS[k][0]) for k in cols], -1)
    n = np.stack([f.assignments if SCALARS[k][0] in _PER_ASSIGNMENT else f.tokens for k in cols], -1)
    inflate = np.maximum(1.0, kappa[..., None] * params["scalar_n0"] / np.maximum(n, 1.0))
    root = np.sqrt(inflate)
    y = (x - params["scalar_mu"]) / (params["scalar_s"] * root)
    hi, lo = _skewed_tails(y, params["scalar_g"] * root)
    sk = _tail_score(np.where(_SIDE_LOW, lo, np.where(_SIDE_HIGH, hi, 2 * np.minimum(hi, lo))))
    sk[..., cols.index(CONCENTRATION)] = np.where(thin, np.nan, sk[..., cols.index(CONCENTRATION)])
    out[..., cols] = np.where(np.isnan(y), np.nan, sk)
    fixed = np.asarray(params.get("load_fixed", 0.0)) > 0  # [] or [G]: see fit
    out[..., _LOAD_CHECKS] = np.where(fixed[..., None], np.nan, out[..., _LOAD_CHECKS])
    # A statistic that could not be computed (no tokens, all logits non-finite) never alarms here.
    return np.where(np.isfinite(out) | (out > 0), out, -np.inf)
