"""Synthetic windows for detector tests: over-dispersed healthy traffic and injected faults.

Builds real :class:`moewatch.windows.Window` objects (the sums and counts the hooks would have
accumulated), so the detector under test runs exactly its production path.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from moewatch.routing import GateInfo
from moewatch.stats import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, NONFINITE, NUM_SCALARS, TOKENS,
                            TOP1)
from moewatch.windows import Window, gate_row, windows_frame


def make_gates(num_gates: int, experts: int, top_k: int = 2, native_capacity: bool = True) -> List[GateInfo]:
    """Simulated gates; capacity-limited by default, so their simulated drops are real drops."""
    return [GateInfo(name=f"layers.{i}.gate", num_experts=experts, top_k=top_k, family="sim",
                     native_capacity=native_capacity)
            for i in range(num_gates)]


def make_window(index: int, counts: np.ndarray, tokens: np.ndarray, entropy: np.ndarray,
                logit_std: np.ndarray, top1: np.ndarray, dropped: Optional[np.ndarray] = None,
                nonfinite: Optional[np.ndarray] = None, logit_mean: float = 0.0,
                requests: Optional[np.ndarray] = None) -> Window:
    """A window from per-gate values: counts [G, E], the rest [G]; ``requests``: the tokens of
    each request in it (as the hooks see a batch's rows), or None where they are not known."""
    g, e = counts.shape
    sums = np.zeros((g, NUM_SCALARS + e))
    n_logits = tokens * e
    sums[:, TOKENS] = tokens
    sums[:, ENTROPY] = entropy * tokens
    sums[:, LOGIT_FINITE] = n_logits
    sums[:, LOGIT_SUM] = logit_mean * n_logits
    sums[:, LOGIT_SQSUM] = (logit_std ** 2 + logit_mean ** 2) * n_logits
    sums[:, TOP1] = top1 * tokens
    sums[:, NONFINITE] = 0 if nonfinite is None else nonfinite
    sums[:, NUM_SCALARS:] = counts / np.maximum(counts.sum(1, keepdims=True), 1) * tokens[:, None]
    cnt = np.zeros((g, 2, e), dtype=np.int64)
    cnt[:, 0] = counts
    if dropped is not None:
        cnt[:, 1] = dropped
    rows = np.zeros(2)
    if requests is not None:
        lengths = np.asarray(requests, dtype=np.float64)
        rows = np.array([lengths.sum(), (lengths ** 2).sum()])
    return Window(index=index, t_start=float(index), t_end=float(index + 1), sums=sums, counts=cnt,
                  absmax=np.full(g, 3.0), rows=rows)


class HealthyTraffic:
    """Over-dispersed routing: each window's expert mix is drawn from a Dirichlet around the
    gate's own shares (Dirichlet-multinomial counts), and its scalar statistics wander (AR(1))."""

    def __init__(self, num_gates: int, experts: int, top_k: int = 2, tokens: int = 4096,
                 concentration: float = 300.0, seed: int = 0, drop_shape: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.gates = make_gates(num_gates, experts, top_k)
        self.top_k, self.tokens, self.concentration = top_k, tokens, concentration
        self.shares = self.rng.dirichlet(np.full(experts, 8.0), size=num_gates)  # [G, E] unequal but healthy
        self.level = np.zeros((num_gates, 3))
        self.index = 0
        # drop_shape > 0: healthy drops too, a gamma-distributed rate (mean 0.5%, skewness
        # 2 / sqrt(drop_shape)): mostly little, now and then a burst, as capacity overflow is
        self.drop_shape = drop_shape

    def window(self, tokens: Optional[int] = None, shares: Optional[np.ndarray] = None,
               logit_scale: float = 1.0, drop_fraction: float = 0.0, nonfinite: int = 0) -> Window:
        tokens = self.tokens if tokens is None else tokens
        g, e = self.shares.shape
        base = self.shares if shares is None else shares
        mix = np.stack([self.rng.dirichlet(self.concentration * np.maximum(b, 1e-9)) for b in base])
        counts = np.stack([self.rng.multinomial(tokens * self.top_k, m) for m in mix])
        self.level = 0.5 * self.level + self.rng.normal(0, 1, self.level.shape)  # AR(1) drift of scalars
        noise = self.level / np.sqrt(1 - 0.25) / np.sqrt(max(tokens, 1) / self.tokens)
        entropy = np.clip(1.2 * (1 + 0.01 * noise[:, 0]) / logit_scale, 0, None)
        logit_std = 1.5 * logit_scale * (1 + 0.01 * noise[:, 1])
        top1 = np.clip(1 - (1 - 0.45 * (1 + 0.01 * noise[:, 2])) / logit_scale, 0, 1)
        if self.drop_shape > 0:
            drop_fraction = drop_fraction + self.rng.gamma(self.drop_shape, 0.005 / self.drop_shape, (g, 1))
        dropped = np.floor(counts * drop_fraction).astype(np.int64)
        w = make_window(self.index, counts, np.full(g, float(tokens)), entropy, logit_std, top1, dropped,
                        np.full(g, float(nonfinite)))
        self.index += 1
        return w

    def frame(self, windows: int):
        """A windows frame (as Monitor.windows() returns) of ``windows`` healthy windows."""
        return windows_frame([self.window() for _ in range(windows)], self.gates)


class ClusteredTraffic:
    """Traffic made of requests whose tokens route alike: each request draws its own expert mix
    around the gate's shares (a Dirichlet of total ``concentration`` per expert) and its own
    level of the scalar statistics, and all of its ``tokens`` follow them. A few requests
    (``specialists``, as a block of whitespace or of digits is in code) send ``focus`` of their
    assignments to one expert of each gate. A window is the sum of the requests it holds, so its
    evidence is closer to its number of requests than to its number of tokens: in a window of
    16 requests a specialist is diluted, alone in a window it is the whole window."""

    def __init__(self, num_gates: int, experts: int, top_k: int = 2, concentration: float = 4.0,
                 seed: int = 0, specialists: float = 0.01, focus: float = 0.8, rows_seen: bool = True):
        self.rng = np.random.default_rng(seed)
        # rows_seen: a window says which requests its tokens came from (a transformers batch's
        # rows, Window.rows); False: it does not (an old baseline, an engine that does not name them)
        self.rows_seen = rows_seen
        self.gates = make_gates(num_gates, experts, top_k)
        self.top_k, self.concentration = top_k, concentration
        self.specialists, self.focus = specialists, focus
        self.shares = self.rng.dirichlet(np.full(experts, 8.0), size=num_gates)  # [G, E]
        self.index = 0

    def window(self, requests: int, tokens: int = 128, shares: Optional[np.ndarray] = None) -> Window:
        """A window of ``requests`` requests of ``tokens`` tokens each."""
        base = self.shares if shares is None else shares
        g, e = base.shape
        # each request's own expert mix per gate (a Dirichlet, drawn as normalised gammas) ...
        mix = self.rng.gamma(self.concentration * e * np.maximum(base, 1e-9), size=(requests, g, e))
        mix /= mix.sum(-1, keepdims=True)
        special = self.rng.random(requests) < self.specialists  # [R]
        if special.any():
            favourite = np.eye(e)[self.rng.integers(0, e, size=(int(special.sum()), g))]  # [S, G, E]
            mix[special] = self.focus * favourite + (1 - self.focus) * mix[special]
        counts = self.rng.multinomial(tokens * self.top_k, mix).sum(0)  # [G, E]
        # ... and its own level of each scalar statistic, which all of its tokens share
        level = 1 + 0.05 * self.rng.normal(0.0, 1.0, (requests, g, 3)).mean(0)  # [G, 3]
        w = make_window(self.index, counts, np.full(g, float(tokens * requests)), 1.2 * level[:, 0],
                        1.5 * level[:, 1], 0.45 * level[:, 2],
                        requests=np.full(requests, tokens) if self.rows_seen else None)
        self.index += 1
        return w

    def frame(self, windows: int, requests: int = 16, tokens: int = 128):
        """A baseline's windows frame: ``windows`` windows of ``requests`` requests each."""
        return windows_frame([self.window(requests, tokens) for _ in range(windows)], self.gates)
