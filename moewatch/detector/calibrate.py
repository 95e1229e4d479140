"""Thresholds from an expected run time (ERT) between false alarms, as online drift detectors do.

1. The user picks ``ert_windows``: on average that many windows pass before one false alarm on
   *any* gate. Split across L gates (Sidak): beta = 1 - (1 - 1/ERT) ** (1/L) per gate and
   window, then across the K checks of a gate (Bonferroni).
2. Each check fires when its score exceeds h1 in one window, or exceeds h_r in ``persistence``
   consecutive windows; half of the check's beta goes to each rule. h_r comes from the
   probability that r consecutive scores of an AR(1) Gaussian all exceed it, so the persistence
   rule is part of the calibration, including the correlation of consecutive windows.
3. The scores are only approximately standard normal. Out-of-sample scores of the baseline's
   own windows (each block scored against a model fitted without it) measure how wrong: a
   moving-block bootstrap over them gives upper bounds on the tail scale ``c`` and on the lag-1
   correlation, and the thresholds are scaled by ``c``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, special

BOOTSTRAP_REPLICATES = 200
UPPER = 0.9  # bootstrap quantile used as the upper bound of the tail scale and correlation
MAX_RHO = 0.95


def sidak(ert_windows: float, num_gates: int) -> float:
    """Per-gate false-alarm probability per window for a family-wise ERT over ``num_gates``."""
    return float(-np.expm1(np.log1p(-1.0 / ert_windows) / max(num_gates, 1)))


def _run_probability(h: float, rho: float, r: int, points: int = 240) -> float:
    """P(Z_1 > h, ..., Z_r > h) for a stationary Gaussian AR(1) with lag-1 correlation rho.

    Markov recursion on a grid over [h, h + 12]: f_{j+1}(y) = int_{x>h} f_j(x) K(x, y) dx.
    """
    if rho <= 1e-9:
        return float(special.ndtr(-h)) ** r
    grid = np.linspace(h, h + 12.0, points)
    w = np.full(points, grid[1] - grid[0])
    w[0] = w[-1] = w[0] / 2
    s = math.sqrt(1 - rho * rho)
    kernel = np.exp(-0.5 * ((grid[None, :] - rho * grid[:, None]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    f = np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi)
    for _ in range(r - 1):
        f = (f * w) @ kernel
    return float((f * w).sum())


@functools.lru_cache(maxsize=256)
def persistent_threshold(target: float, rho: float, r: int) -> float:
    """h such that r consecutive scores all exceed h with probability ``target``."""
    if r <= 1:
        return float(-special.ndtri(target))
    lo, hi = 0.0, float(-special.ndtri(target))  # r = 1 is the upper end
    goal = math.log(target)
    return float(optimize.brentq(lambda h: math.log(max(_run_probability(h, rho, r), 1e-300)) - goal,
                                 lo, hi, xtol=1e-4))


def _lag1(x: np.ndarray) -> float:
    if x.size < 3 or x.std() == 0:
        return 0.0
    return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def _tail_scale(x: np.ndarray) -> float:
    """How much wider than N(0, 1) the upper tail is, matched at the 90% and the top quantile."""
    n = x.size
    levels = [0.9] + ([1 - 2.0 / n] if 1 - 2.0 / n > 0.9 else [])
    ratios = [np.quantile(x, q) / -special.ndtri(1 - q) for q in levels]
    return max(1.0, *ratios)


def bootstrap_bounds(scores: np.ndarray, rng: np.random.Generator) -> tuple:
    """Upper bounds (tail scale c, lag-1 correlation) of one check's baseline scores [W]."""
    x = np.clip(scores[np.isfinite(scores)], -50, 50)
    n = x.size
    if n < 4:
        return 2.0, 0.5  # too little to learn from: stay conservative
    block = max(2, int(round(math.sqrt(n))))
    starts_max = n - block + 1
    blocks = -(-n // block)
    scale, corr = [], []
    for _ in range(BOOTSTRAP_REPLICATES):
        starts = rng.integers(0, starts_max, size=blocks)
        sample = np.concatenate([x[s:s + block] for s in starts])[:n]
        scale.append(_tail_scale(sample))
        corr.append(_lag1(sample))
    c = max(_tail_scale(x), float(np.quantile(scale, UPPER)))
    rho = float(np.clip(max(_lag1(x), np.quantile(corr, UPPER)), 0.0, MAX_RHO))
    return c, rho


def thresholds(scores: np.ndarray, beta_check: float, persistence: int, rng: np.random.Generator):
    """(h1, h_r, c, rho) per check, from baseline scores [W, K]."""
    k = scores.shape[1]
    h1, hr, cs, rhos = (np.empty(k) for _ in range(4))
    single = beta_check if persistence <= 1 else beta_check / 2
    for j in range(k):
        c, rho = bootstrap_bounds(scores[:, j], rng)
        rho = math.ceil(rho * 20) / 20  # a coarse grid (rounded up) keeps the threshold cache small
        h1[j] = c * -special.ndtri(single)
        hr[j] = c * persistent_threshold(float(f"{single:.6g}"), rho, persistence) if persistence > 1 else h1[j]
        cs[j], rhos[j] = c, rho
    return h1, hr, cs, rhos
