"""The CPU reader's reduction, common case, in one compiled pass (numba, where it is installed).

:mod:`numpy_backend` computes a window's per-token quantities with some thirty numpy ops, each a
pass over an [E, n] temporary: at decode sizes the ops' own overhead is most of the cost, at
prefill sizes the passes through memory are. This kernel makes one pass: for each block of 64
tokens of a segment, the block's logits [E, 64] are read once into a scratch that stays in L1
and every per-token quantity is made and summed there; then the counts and co-selection, token
by token. Its exp is a polynomial of its own that the compiler vectorises across the block's
tokens (numba has no vector exp without Intel's SVML): relative error about 2e-7, an ulp or two
of float32, within the tolerance the backends are tested to against the reference
(``tests/test_numpy_backend.py`` runs every case with this kernel and without it). Measured side
by side (``python benchmarks/reader_kernel.py``, one reduction of 4 gates, co-selection on):
about 1.8x less time than numpy at prefill sizes, 2-2.8x for wide routers, 3-5x at decode sizes,
2-4x with sigmoid scoring.

It takes the common case: softmax or sigmoid scoring from the logits with the router's own
expert ids (so no top-k is taken here), with or without padding weights (a log of its own for
sigmoid's entropy, as for exp). Router-given probabilities and routers without ids stay with
numpy; with native or would-be drops or a placement, the kernel makes the float statistics and
the counts, numpy the drops, the co-selection and the tokens per rank. It runs without the
interpreter lock (``nogil``), so the model's thread is not held while the reader reduces.

numba compiles the kernel on first use: about 2 s holding the interpreter lock, most of it
numba's own start-up, which a process pays even where the machine code comes from numba's disk
cache (``cache=True``). The staged backend calls :func:`available` when it is attached, so that
this happens before the model runs, never on the reader beside a forward. Where numba is absent
or cannot compile, :func:`available` says False and numpy reduces, to the same sums.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import numpy as np

from .layout import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, MARGIN, NONFINITE, NUM_SCALARS, TOKENS,
                     TOP1, ZLOSS)

# The values of MOEWATCH_CPU_KERNEL (engines check it at start-up: ``engines.env``).
KERNEL_CHOICES = ("numba", "numpy")
# False: reduce with numpy alone (benchmarks compare the two; tests run both). The process's
# MOEWATCH_CPU_KERNEL=numpy sets it at import (MOEWATCH_CPU_KERNEL=numba or unset: the kernel).
enabled = os.environ.get("MOEWATCH_CPU_KERNEL", "numba").strip().lower() != "numpy"

BLOCK_TOKENS = 64  # a block's [E, 64] float32 scratch: 2 KB at 8 experts, 64 KB at 256

_kernel = None  # the compiled kernel once made; False where it cannot be
_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled kernel reduces (``enabled``, numba importable, the kernel compiled
    or loaded from numba's cache). Compiles on the first call: call it before the model runs."""
    global _kernel
    if not enabled:
        return False
    if _kernel is None:
        with _lock:
            if _kernel is None:
                _kernel = _compile()
    return _kernel is not False


def segment_sums(logits: np.ndarray, slots: np.ndarray, weights: Optional[np.ndarray], starts: np.ndarray,
                 ends: np.ndarray, coselect: bool, sigmoid: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """What :func:`numpy_backend.segment_sums` gives for each segment, without drops or a
    placement: float64 [S, NUM_SCALARS + E] (the layout's columns, then the routing
    probabilities per expert) and float64 [S] the max |logit|, both weighted where ``weights``
    [T] (float64) is given; int64 [S, E] the traffic tokens' assignments; int64 [S, E, E] their
    co-selection (upper triangle, see ``layout``) where ``coselect``, else None. ``logits``
    float32 [E, T] expert-major; ``slots`` [T, k] the router's expert ids (each in [0, E));
    segment s is tokens ``starts[s]`` to ``ends[s]``; ``sigmoid``: sigmoid scoring (the scores
    normalised per token), else softmax. Call only where :func:`available` said True."""
    num_experts, num_segments = logits.shape[0], starts.shape[0]
    total = np.zeros((num_segments, NUM_SCALARS + num_experts))  # [S, C]
    absmax = np.zeros(num_segments)  # [S]
    counts = np.zeros((num_segments, num_experts), dtype=np.int64)  # [S, E]
    cosel = np.zeros((num_segments, num_experts, num_experts) if coselect else (0, 0, 0), dtype=np.int64)
    weighted = weights is not None
    w = np.ascontiguousarray(weights, dtype=np.float64) if weighted else np.ones(0)  # [T] or [0]
    _kernel(np.ascontiguousarray(logits, dtype=np.float32), np.ascontiguousarray(slots, dtype=np.int64), w,
            weighted, np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(ends, dtype=np.int64),
            coselect, sigmoid, total, absmax, counts, cosel)
    return total, absmax, counts, cosel if coselect else None


def _compile():
    """The compiled kernel, or False where numba is absent or cannot compile it (numpy then
    reduces). Cached on disk where numba finds a place to (beside this file, else its user-wide
    cache directory); compiled for this process alone where it finds none."""
    try:
        import numba
    except Exception:
        return False
    _answer_scans_of_llvmlite()
    global _exp_parts, _logs
    if not hasattr(_exp_parts, "py_func"):  # the kernel calls them: compiled first, inlined into it
        _exp_parts = numba.njit(inline="always", fastmath=_FAST_MATH)(_exp_parts)
        _logs = numba.njit(inline="always", fastmath=_FAST_MATH)(_logs)
    for cache in (True, False):
        try:
            kernel = numba.njit(nogil=True, cache=cache, fastmath=_FAST_MATH, boundscheck=False)(_gate_sums)
            # compile (or load) now, on small arguments: not on the reader beside a forward
            kernel(np.zeros((2, 1), np.float32), np.zeros((1, 1), np.int64), np.ones(0), False,
                   np.zeros(1, np.int64), np.ones(1, np.int64), True, False, np.zeros((1, NUM_SCALARS + 2)), np.zeros(1),
                   np.zeros((1, 2), np.int64), np.zeros((1, 2, 2), np.int64))
            return kernel
        except Exception:
            continue
    return False


def _answer_scans_of_llvmlite() -> None:
    """numba loads llvmlite, whose library object (``llvmlite.binding.ffi.lib``) answers every
    attribute it lacks, ``__dict__`` included, with a wrapped C function. Code that scans the
    objects of every loaded module and reads their ``__dict__`` then fails on it: vLLM does at
    each engine's start-up (its kernel overrides), so once moewatch had compiled its kernel in a
    process, the next vLLM engine made there failed to start. The object's ``__dict__`` is made
    an empty dict, what such a scan expects (llvmlite calls no C function by that name)."""
    try:
        from llvmlite.binding import ffi

        table = ffi.lib._fntab  # name -> wrapped C function, read before any lookup of the library
        if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
            table["__dict__"] = {}
    except Exception:  # another llvmlite: nothing to answer, or nothing known about it
        pass


# Reassociation lets sums over a block's tokens vectorise; no 'nnan'/'ninf': the kernel tests
# logits for NaN and Inf, which those flags would let the compiler assume away.
_FAST_MATH = {"reassoc", "nsz", "arcp", "contract"}

# exp(d) for d in [-87, 88] as 2**j * poly(r): j = round(d / ln 2), r = d - j ln 2 in [-ln2/2, ln2/2]
# (ln 2 split in two so that j ln 2 is exact), poly the degree-6 Taylor series (truncation
# below 2e-7 relative on that range). d is clamped at -87, where exp is about 1.6e-38: the
# reference's exp there is a denormal or 0, a difference far below float32 resolution of a sum.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)
_EXP_CEILING = np.float32(88.0)  # sigmoid's exp(-x): 2**127 at most, below float32's largest

# log(y) for positive normal y (the softmax's norm, 1 + exp(-x), sigmoid's sum): y = 2**m * f,
# f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(u), u = (f - 1) / (f + 1) in [-0.172, 0.172], by
# its series to u**9 (truncation about 1e-9).
_SQRT2 = np.float32(1.4142135623730951)
_LN2 = np.float32(0.6931471805599453)


def _exp_parts(d):  # pragma: no cover - compiled, inlined into the kernel
    """exp(d) = poly * 2**j for float32 d in [-87, 88] (see _LOG2E): (poly, the float32 bits of
    2**j); the kernel multiplies them after a loop, so that both loops vectorise."""
    j = np.floor(d * _LOG2E + np.float32(0.5))
    r = d - j * _LN2_HIGH - j * _LN2_LOW  # [-ln2/2, ln2/2]
    poly = np.float32(1.0 / 720) * r + np.float32(1.0 / 120)
    poly = poly * r + np.float32(1.0 / 24)
    poly = poly * r + np.float32(1.0 / 6)
    poly = poly * r + np.float32(0.5)
    poly = poly * r + np.float32(1)
    return poly * r + np.float32(1), (np.int32(j) + np.int32(127)) << 23


def _logs(bits, out, n, mantissa_bits, mantissa, exponent):  # pragma: no cover - compiled, inlined
    """out[:n] = log of the positive normal float32 values whose bits are ``bits`` [n] (int32),
    see _SQRT2; ``mantissa_bits`` (int32), its float32 view ``mantissa`` and ``exponent`` are
    scratch of at least n. Two loops, so that both vectorise."""
    for b in range(n):
        exponent[b] = np.float32((bits[b] >> 23) - 127)
        mantissa_bits[b] = (bits[b] & 0x007FFFFF) | 0x3F800000  # the mantissa, in [1, 2)
    for b in range(n):
        f = mantissa[b]
        big = f > _SQRT2
        f = f * np.float32(0.5) if big else f  # in [sqrt(1/2), sqrt(2))
        u = (f - np.float32(1)) / (f + np.float32(1))
        u2 = u * u
        series = np.float32(1.0 / 9) * u2 + np.float32(1.0 / 7)
        series = series * u2 + np.float32(1.0 / 5)
        series = series * u2 + np.float32(1.0 / 3)
        series = series * u2 + np.float32(1)
        out[b] = (exponent[b] + (np.float32(1) if big else np.float32(0))) * _LN2 + np.float32(2) * u * series


def _gate_sums(logits, slots, weights, weighted, starts, ends, coselect, sigmoid, total, absmax, counts,
               cosel):  # pragma: no cover - compiled
    """The kernel (compiled by numba; the shapes: ``logits`` [E, T] float32, ``slots`` [T, k]
    int64, ``weights`` [T] float64 or [0], ``starts``/``ends`` [S] int64; added into: ``total``
    [S, C] float64, ``absmax`` [S] float64, ``counts`` [S, E] int64, ``cosel`` [S, E, E] int64
    or [0, 0, 0]). Per token, as :func:`numpy_backend._token_stats`: non-finite logits are
    counted and read as 0; softmax p, entropy log(norm) - sum p (x - peak); or with ``sigmoid``
    p = s / max(sum s, 1e-30), s = 1 / (1 + exp(-x)), entropy from sum s log s; the top two of p
    (the second equals the top where two share it, 0 for one expert); logit sum and square
    sum; lse**2; max |x|. Per traffic token (weight not 0), as ``numpy_backend.coselection``:
    each slot counted; its experts as a set (a repeated id once), each pair at (min, max) and
    each expert on the diagonal."""
    num_experts, k = logits.shape[0], slots.shape[1]
    block = BLOCK_TOKENS
    clean = np.empty((num_experts, block), np.float32)  # [E, b] the block's logits, non-finite as 0
    exps = np.empty((num_experts, block), np.float32)  # [E, b] exp(x - peak)
    scale_bits = np.empty(block, np.int32)  # [b] 2**j of each exp, as float32 bits ...
    scale = scale_bits.view(np.float32)  # ... read as floats
    peak = np.empty(block, np.float32)  # [b] max logit
    low = np.empty(block, np.float32)  # [b] min logit
    logit_sum = np.empty(block, np.float32)  # [b]
    square_sum = np.empty(block, np.float32)  # [b]
    bad = np.empty(block, np.float32)  # [b] non-finite logits
    norm = np.empty(block, np.float32)  # [b] sum of exps
    shifted_sum = np.empty(block, np.float32)  # [b] sum exp(x - peak) * (x - peak)
    top1 = np.empty(block, np.float32)  # [b]
    second = np.empty(block, np.float32)  # [b]
    inverse = np.empty(block, np.float32)  # [b] 1 / the sum p is normalised by
    # sigmoid scoring only
    score_sum = np.empty(block, np.float32)  # [b] sum s
    score_log_sum = np.empty(block, np.float32)  # [b] sum s log s
    below = np.empty(block, np.float32)  # [b] exp(-x) before its 2**j
    positive = np.empty(block, np.float32)  # [b] 1 + exp(-x), or max(sum s, 1e-30): to take the log of
    # logs (see _logs): the floats' bits, their mantissas with exponent 0 read as floats, their powers of two
    norm_bits, positive_bits = norm.view(np.int32), positive.view(np.int32)
    mantissa_bits = np.empty(block, np.int32)
    mantissa = mantissa_bits.view(np.float32)
    exponent = np.empty(block, np.float32)
    log_norm = np.empty(block, np.float32)  # [b]
    logs = np.empty(block, np.float32)  # [b] log of positive
    for segment in range(starts.shape[0]):
        sums = total[segment]  # [C]
        for first in range(starts[segment], ends[segment], block):
            n = min(block, ends[segment] - first)
            for b in range(n):
                peak[b] = -np.inf
                low[b] = np.inf
                logit_sum[b] = 0
                square_sum[b] = 0
                bad[b] = 0
                norm[b] = 0
                shifted_sum[b] = 0
                top1[b] = 0
                second[b] = 0
            for e in range(num_experts):  # one pass over the block's logits
                for b in range(n):
                    v = logits[e, first + b]
                    finite = abs(v) < np.float32(np.inf)  # False for NaN and +-Inf
                    v = v if finite else np.float32(0)
                    bad[b] += np.float32(0) if finite else np.float32(1)
                    clean[e, b] = v
                    logit_sum[b] += v
                    square_sum[b] += v * v
                    peak[b] = max(peak[b], v)
                    low[b] = min(low[b], v)
            for e in range(num_experts):
                for b in range(n):  # exp(x - peak), see _exp_parts
                    exps[e, b], scale_bits[b] = _exp_parts(max(clean[e, b] - peak[b], _EXP_FLOOR))
                for b in range(n):
                    z = exps[e, b] * scale[b]
                    exps[e, b] = z
                    norm[b] += z
                    shifted_sum[b] += z * (clean[e, b] - peak[b])
            if sigmoid:  # the scores s = 1 / (1 + exp(-x)) replace the exps; norm stays the softmax's (lse)
                for b in range(n):
                    score_sum[b] = 0
                    score_log_sum[b] = 0
                for e in range(num_experts):
                    for b in range(n):  # exp(-x), see _exp_parts
                        below[b], scale_bits[b] = _exp_parts(min(max(-clean[e, b], _EXP_FLOOR), _EXP_CEILING))
                    for b in range(n):
                        y = np.float32(1) + below[b] * scale[b]
                        positive[b] = y
                        score = np.float32(1) / y
                        exps[e, b] = score
                        score_sum[b] += score
                    _logs(positive_bits, logs, n, mantissa_bits, mantissa, exponent)  # log(1 + exp(-x))
                    for b in range(n):
                        score_log_sum[b] -= exps[e, b] * logs[b]  # s log s, log s = -log(1 + exp(-x))
                for b in range(n):
                    positive[b] = max(score_sum[b], np.float32(1e-30))
                    inverse[b] = np.float32(1) / positive[b]
                _logs(positive_bits, logs, n, mantissa_bits, mantissa, exponent)  # log max(sum s, 1e-30)
            else:
                for b in range(n):
                    inverse[b] = np.float32(1) / norm[b]
            _logs(norm_bits, log_norm, n, mantissa_bits, mantissa, exponent)
            for e in range(num_experts):  # p, its top two, its sum per expert
                expert_sum = 0.0
                for b in range(n):
                    p = exps[e, b] * inverse[b]
                    second[b] = max(second[b], min(top1[b], p))
                    top1[b] = max(top1[b], p)
                    expert_sum += p * weights[first + b] if weighted else p
                sums[NUM_SCALARS + e] += expert_sum
            tokens = entropy = logit_total = square_total = finite_total = 0.0
            top1_total = margin_total = zloss_total = bad_total = 0.0
            largest = absmax[segment]
            for b in range(n):
                w = weights[first + b] if weighted else 1.0
                lse = peak[b] + log_norm[b]
                tokens += w
                if sigmoid:  # -sum p log p, p = s / S', S' = max(S, 1e-30): (S / S') log S' - sum s log s / S'
                    entropy += (score_sum[b] * inverse[b] * logs[b] - score_log_sum[b] * inverse[b]) * w
                else:
                    entropy += (log_norm[b] - shifted_sum[b] * inverse[b]) * w
                logit_total += logit_sum[b] * w
                square_total += square_sum[b] * w
                finite_total += (num_experts - bad[b]) * w
                top1_total += top1[b] * w
                margin_total += (top1[b] - second[b]) * w
                zloss_total += lse * lse * w
                bad_total += bad[b] * w
                magnitude = np.float32(max(peak[b], -low[b]))
                if weighted:
                    magnitude = magnitude * np.float32(w)
                largest = max(largest, magnitude)
            sums[TOKENS] += tokens
            sums[ENTROPY] += entropy
            sums[LOGIT_SUM] += logit_total
            sums[LOGIT_SQSUM] += square_total
            sums[LOGIT_FINITE] += finite_total
            sums[TOP1] += top1_total
            sums[MARGIN] += margin_total
            sums[ZLOSS] += zloss_total
            sums[NONFINITE] += bad_total
            absmax[segment] = largest
        for t in range(starts[segment], ends[segment]):  # the integer counts, token by token
            if weighted and weights[t] == 0:  # padding: not traffic
                continue
            for a in range(k):
                counts[segment, slots[t, a]] += 1
            if not coselect:
                continue
            distinct = True  # the token names each expert once (every router's top-k)
            for a in range(1, k):
                for earlier in range(a):
                    distinct = distinct and slots[t, earlier] != slots[t, a]
            for a in range(k):
                first_id = slots[t, a]
                if not distinct:
                    repeated = False
                    for earlier in range(a):
                        repeated = repeated or slots[t, earlier] == first_id
                    if repeated:  # a set: the expert was counted at its first slot
                        continue
                cosel[segment, first_id, first_id] += 1
                for b in range(a + 1, k):
                    second_id = slots[t, b]
                    again = False  # a pair is counted where its two ids first appear
                    if not distinct:
                        for earlier in range(b):
                            again = again or slots[t, earlier] == second_id
                    if not again:
                        cosel[segment, min(first_id, second_id), max(first_id, second_id)] += 1
