"""The per-window quantities the detector tests, computed the same way for baseline and live windows.

Everything is vectorised over leading dimensions: [G] gates of one live window, or [W] windows
of one gate's baseline. Expert axes are last ([..., E]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stats import ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, NONFINITE, TOKENS, TOP1


@dataclass
class Features:
    tokens: np.ndarray  # [...]
    assignments: np.ndarray  # [...]
    counts: np.ndarray  # [..., E] assignments per expert
    share: np.ndarray  # [..., E] counts / assignments (0 where no assignments)
    drop_rate: np.ndarray  # [...]
    entropy: np.ndarray  # [...] mean token routing entropy (nats)
    logit_std: np.ndarray  # [...]
    top1: np.ndarray  # [...] mean top-1 probability
    nonfinite: np.ndarray  # [...] non-finite logits in the window
    effective: np.ndarray  # [...] exp(load entropy), small-sample corrected (Miller-Madow)
    requests: np.ndarray  # [...] how many requests the window's tokens are worth (nan: not known)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def effective_experts(counts: np.ndarray) -> np.ndarray:
    """exp(entropy of the load), with the Miller-Madow correction (m - 1) / 2n.

    The plain plug-in entropy of a small window is biased low (a few hundred assignments over
    256 experts look concentrated by chance); the correction keeps small windows from looking
    like a collapse.
    """
    n = counts.sum(-1)
    share = counts / np.maximum(n, 1)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0)
    entropy = -plogp.sum(-1)
    used = (counts > 0).sum(-1)
    corrected = entropy + (used - 1) / (2.0 * np.maximum(n, 1))
    return np.where(n > 0, np.exp(corrected), np.nan)


def make_features(tokens, counts, dropped, entropy, logit_std, top1, nonfinite, requests=None) -> Features:
    counts = np.asarray(counts, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    requests = np.full(tokens.shape, np.nan) if requests is None else np.broadcast_to(
        np.asarray(requests, dtype=np.float64), tokens.shape).copy()
    assignments = counts.sum(-1)
    share = counts / np.maximum(assignments, 1)[..., None]
    return Features(
        tokens=np.asarray(tokens, dtype=np.float64), assignments=assignments, counts=counts, share=share,
        drop_rate=_safe_div(np.asarray(dropped, dtype=np.float64), assignments),
        entropy=np.asarray(entropy, dtype=np.float64), logit_std=np.asarray(logit_std, dtype=np.float64),
        top1=np.asarray(top1, dtype=np.float64), nonfinite=np.asarray(nonfinite, dtype=np.float64),
        effective=effective_experts(counts), requests=requests,
    )


def baseline_features(gate) -> Features:
    """Features of every window of one :class:`moewatch.baseline.GateBaseline` ([W])."""
    s = gate.series
    return make_features(s["tokens"], gate.expert_counts, s["dropped"], s["entropy_mean"], s["logit_std"],
                         s["top1_prob_mean"], s["nonfinite_logits"], s.get("requests"))


def window_features(window, num_experts: int) -> Features:
    """Features of every gate of one live :class:`moewatch.windows.Window` ([G], experts padded).

    Mirrors :func:`moewatch.windows.gate_row` without building a row per gate.
    """
    s = window.sums
    tokens = s[:, TOKENS]
    n_logits = s[:, LOGIT_FINITE]
    mean = _safe_div(s[:, LOGIT_SUM], n_logits)
    variance = _safe_div(s[:, LOGIT_SQSUM], n_logits) - mean ** 2
    counts = window.counts[:, 0, :num_experts]
    dropped = window.counts[:, 1, :num_experts].sum(-1)
    return make_features(tokens, counts, dropped, _safe_div(s[:, ENTROPY], tokens),
                         np.sqrt(np.maximum(variance, 0.0)), _safe_div(s[:, TOP1], tokens), s[:, NONFINITE],
                         window.requests)
