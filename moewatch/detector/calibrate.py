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


def _lag1(x: np.ndarray) -> np.ndarray:
    """Lag-1 autocorrelation along axis -2 of [..., n, K] (0 where a series is constant)."""
    a, b = x[..., :-1, :], x[..., 1:, :]
    a = a - a.mean(-2, keepdims=True)
    b = b - b.mean(-2, keepdims=True)
    den = np.sqrt((a * a).sum(-2) * (b * b).sum(-2))
    return np.where(den > 0, (a * b).sum(-2) / np.where(den > 0, den, 1), 0.0)


def _tail_scale(x: np.ndarray) -> np.ndarray:
    """How much wider than N(0, 1) the upper tail is, along axis -2 of [..., n, K]: the empirical
    quantile over the normal one, at 90% and at the top (1 - 2/n), whichever is larger."""
    n = x.shape[-2]
    levels = [0.9] + ([1 - 2.0 / n] if 1 - 2.0 / n > 0.9 else [])
    ratios = [np.quantile(x, q, axis=-2) / -special.ndtri(1 - q) for q in levels]
    return np.maximum(1.0, np.max(ratios, axis=0))


def bootstrap_bounds(scores: np.ndarray, rng: np.random.Generator) -> tuple:
    """Upper bounds (tail scale c [K], lag-1 correlation [K]) of baseline scores [W, K].

    Moving-block bootstrap (blocks of ~sqrt(W) consecutive windows keep their serial
    dependence); the bounds are the UPPER quantile over replicates, and never below the
    estimate from the windows as they are.
    """
    # A window that could not be scored (e.g. no tokens) counts as a quiet one.
    x = np.clip(np.where(np.isnan(scores), -50, scores), -50, 50)
    n, k = x.shape
    if n < 4:
        return np.full(k, 2.0), np.full(k, 0.5)  # too little to learn from: stay conservative
    block = max(2, int(round(math.sqrt(n))))
    blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(BOOTSTRAP_REPLICATES, blocks))
    idx = (starts[:, :, None] + np.arange(block)).reshape(BOOTSTRAP_REPLICATES, -1)[:, :n]  # [B, n]
    sample = x[idx]  # [B, n, K]
    c = np.maximum(_tail_scale(x), np.quantile(_tail_scale(sample), UPPER, axis=0))
    rho = np.clip(np.maximum(_lag1(x), np.quantile(_lag1(sample), UPPER, axis=0)), 0.0, MAX_RHO)
    return c, rho


def thresholds(scores: np.ndarray, beta_check: float, persistence: int, rng: np.random.Generator):
    """(h1, h_r, c, rho) per check, from baseline scores [W, K]."""
    single = beta_check if persistence <= 1 else beta_check / 2
    c, rho = bootstrap_bounds(scores, rng)
    rho = np.ceil(rho * 20) / 20  # a coarse grid (rounded up) keeps the threshold cache small
    h1 = c * -special.ndtri(single)
    if persistence <= 1:
        return h1, h1.copy(), c, rho
    target = float(f"{single:.6g}")
    hr = c * np.array([persistent_threshold(target, float(r), persistence) for r in rho])
    return h1, hr, c, rho
