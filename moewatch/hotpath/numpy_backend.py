"""The CPU reader's reduction: the reference's statistics, computed with numpy.

Same inputs, same :class:`~moewatch.hotpath.reference.GateSums`, same per-token math as
:func:`moewatch.hotpath.reference.gate_sums`, the oracle it is tested against
(``tests/test_numpy_backend.py``). The staged CPU backend (``staged``) reduces a window's calls
with it, on the reader thread, because there:

- numpy dispatches an op in about a microsecond where torch takes five to ten, and a reduction
  is a few dozen ops: at decode sizes dispatch was most of the reader's cost;
- the gates of a kind are one pass (``segment_sums``): S gates cost about what one does;
- fewer passes: finite logits (the common case) are recognised by their per-token sums, so
  the non-finite replacement and its comparison are skipped; the per-token quantities are
  written into one table and summed once; narrow routers keep a running top two; co-selection
  where no token repeats an expert (every top-k) counts each pair of slots in one pass and takes
  its diagonal from the counts.

Measured on one warm thread (2-core machine, E = 8, k = 2, co-selection on): about 3x less
time than the torch reference at 400 and at 16k tokens (94 vs 275 us; 1.1 vs 3.2 ms), ~70 ns
a token at large sizes, ~150 ns with the model's threads busy beside it.

Counts, drops, co-selection and tokens per rank are exact (integer ops on the same ids). Float
sums agree with the reference to float tolerance: numpy's float32 exp and log may differ from
torch's by an ulp; the reference sums in float64, this in float64 across pieces of at most 16k
tokens and, unweighted, pairwise in float32 within one (token counts stay exact). Where the
router gives no indices, the top-k is taken by ``torch.topk`` on these probabilities in the
reference's layout, so exact ties break as the reference breaks them.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from scipy.special import entr

from . import numba_backend, reference
from .layout import (ENTROPY, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, MARGIN, NONFINITE, NUM_SCALARS, SIGMOID,
                     SOFTMAX, TOKENS, TOP1, ZLOSS)
from .reference import GateSums, scoring_code


def as_array(tensor: torch.Tensor, dtype=np.float32) -> np.ndarray:
    """A numpy view of a CPU tensor as ``dtype`` (a copy only where the dtype differs: torch
    upcasts half and bfloat16, which numpy cannot read)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if dtype is np.float32 and tensor.dtype != torch.float32:
        tensor = tensor.float()
    array = tensor.numpy()
    return array if array.dtype == dtype else array.astype(dtype)


def as_tensor(value):
    """A tensor of a numpy array (a staged call's copy in the arena: ``arena``), or the value as
    it is (a tensor, None)."""
    return torch.from_numpy(value) if type(value) is np.ndarray else value


def concat(tensors, dtype=np.float32) -> np.ndarray:
    """The tensors [T_i, W] (or [..., W]) of many calls as one array [sum T_i, W] of ``dtype``:
    one ``torch.cat`` (converting each call's tensor on its own cost the reader ~6 us a call),
    or one ``np.concatenate`` where every member is an array (the arena's copies: a tensor of
    each cost ~1 us, 44 prefill calls' logits 79 us against 25)."""
    if _all_arrays(tensors):
        joined = np.concatenate(tensors)  # fails where widths differ, as torch.cat
        return joined if joined.dtype == dtype else joined.astype(dtype)
    return _cat_tensors(tensors, dtype)


def _all_arrays(tensors) -> bool:
    """Whether every member is a 2-D numpy array (an arena copy)."""
    return all([type(t) is np.ndarray and t.ndim == 2 for t in tensors])


def _cat_tensors(tensors, dtype=np.float32) -> np.ndarray:
    """:func:`concat` by one ``torch.cat`` (members may be arena copies, or of more dimensions)."""
    width = tensors[0].shape[-1]
    tensors = [as_tensor(t) for t in tensors]
    with torch.no_grad():  # the reader's grad mode is on: no history for tensors that require grad
        joined = torch.cat([t if t.dim() == 2 else t.reshape(-1, width) for t in tensors])  # fails where widths differ
    return as_array(joined, dtype)


# The [T, E] -> [E, T] copy goes block by block of tokens: numpy's transposing copy of a whole
# wide array thrashes the cache (16k tokens of 64 experts: 6.6 ms whole, 0.63 ms in blocks of 64
# tokens; 4k tokens of 256: 6.8 ms, 0.65 ms). Narrow routers copy well in long blocks, where a
# short block's own overhead would show (16k tokens of 8 experts: 38 us whole).
WIDE_EXPERTS = 32
WIDE_BLOCK_TOKENS = 64
NARROW_BLOCK_TOKENS = 8192


def concat_experts(tensors) -> np.ndarray:
    """The logits [T_i, E] (or [..., E]) of many calls as one C-contiguous float32 array
    [E, sum T_i], the layout the reduction works in: the calls' rows in order, each call's
    transposed blocks copied straight into their columns (see ``WIDE_BLOCK_TOKENS``). Tensors
    are joined by one ``torch.cat`` first (converting each call's tensor on its own cost ~6 us
    a call); arena copies (numpy arrays) are read where they are."""
    width = tensors[0].shape[-1]
    if not _all_arrays(tensors):
        tensors = [_cat_tensors(tensors)]  # [sum T, E] float32
    block = WIDE_BLOCK_TOKENS if width >= WIDE_EXPERTS else NARROW_BLOCK_TOKENS
    blocks = [t[first:first + block].T for t in tensors for first in range(0, t.shape[0], block)]  # [E, <= block]
    if len(blocks) == 1:  # one short or narrow array: numpy's own copy has the least overhead
        return np.ascontiguousarray(blocks[0], dtype=np.float32)
    out = np.empty((width, sum([b.shape[1] for b in blocks])), dtype=np.float32)  # [E, sum T]
    if blocks:  # else no token at all: [E, 0]
        np.concatenate(blocks, axis=1, out=out)  # fails where the calls' widths differ, as torch.cat
    return out


def _input(value, dtype=np.float32) -> Optional[np.ndarray]:
    if value is None or isinstance(value, np.ndarray):
        return value if value is None or value.dtype == dtype else value.astype(dtype)
    return as_array(value, dtype)


def gate_sums(
    logits,
    indices,
    valid,
    scoring,
    top_k: int,
    probs=None,
    dropped=None,
    capacity_factor: float = 0.0,
    call_ids=None,
    num_calls: int = 1,
    ranks: Optional[torch.Tensor] = None,
    coselect: bool = False,
) -> GateSums:
    """:func:`reference.gate_sums` in numpy (see the module docstring), as tensors. CPU tensors
    or numpy arrays: logits [T, E]; indices [T, k] or None; valid [T] or None; probs [T, E] or
    None; dropped [T, k] or None; call_ids [T] or None; ranks [E] or None."""
    (part,) = segment_sums(logits, indices, valid, scoring, top_k, probs, dropped, capacity_factor, call_ids,
                           num_calls, ranks, coselect)
    return GateSums(*[None if value is None else torch.from_numpy(np.asarray(value)) for value in part])


def segment_sums(logits, indices, valid, scoring, top_k: int, probs=None, dropped=None,
                 capacity_factor: float = 0.0, call_ids=None, num_calls: int = 1, ranks=None,
                 coselect: bool = False, starts=None, expert_major: bool = False) -> List[GateSums]:
    """The sums of each segment of the tokens, as numpy arrays: one ``GateSums`` per segment.

    ``starts`` [S] (ascending, from 0): segment s is the tokens from ``starts[s]`` up to the next
    start (None: one segment). The reader puts the calls of several gates of the same kind one
    after the other and reduces them in one pass: the per-token math is the same, only the last
    sums are per segment, so S gates cost about what one does. ``call_ids`` [T] number the calls
    across segments (a call lies within one segment); ``ranks`` [E] only with one segment;
    ``expert_major``: the logits are given as [E, T] (:func:`concat_experts`). Arguments
    otherwise as :func:`gate_sums`.
    """
    # Non-finite logits are expected input (counted, then replaced): no numpy warnings about them,
    # which a process that turns warnings into errors would raise on the reader.
    with np.errstate(all="ignore"):
        return _segment_sums(logits, indices, valid, scoring, top_k, probs, dropped, capacity_factor, call_ids,
                             num_calls, ranks, coselect, starts, expert_major)


# Tokens are reduced in pieces whose [E, n] float32 temporaries hold at most this many values
# (512 KB): unbounded, a window's temporaries were fresh mmaps of many MB, page-faulted on every
# use (3-4x slower a token at 64k tokens); pieces of 32k-128k values measured alike, the larger a
# little faster (fewer ops), with the model's threads busy beside them.
PIECE_VALUES = 131072
MIN_PIECE_TOKENS = 256  # wide routers: the ops' own overhead stays small beside their work
# Segments of a piece at least this long on average are summed slice by slice (pairwise, in
# float32: 16k tokens of 8 experts in 4 segments 55 us, against 187 us for reduceat in float64).
SLICED_SEGMENT_TOKENS = 256


def _segment_sums(logits, indices, valid, scoring, top_k, probs, dropped, capacity_factor, call_ids, num_calls,
                  ranks, coselect, starts, expert_major) -> List[GateSums]:
    num_tokens, num_experts = logits.shape[::-1] if expert_major else logits.shape
    starts = np.zeros(1, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)  # [S]
    num_segments = starts.shape[0]
    if ranks is not None and num_segments != 1:
        raise ValueError("a placement's ranks apply to one segment (one gate) at a time")
    if num_tokens == 0:  # nothing to compute: the reference's zeros
        part = reference.gate_sums(torch.zeros(0, num_experts), None, None, scoring, top_k, None, None,
                                   capacity_factor, None, num_calls, ranks, coselect)
        return [GateSums(*[None if value is None else value.numpy() for value in part])] * num_segments
    raw = _input(logits)  # [T, E] float32, or [E, T] where expert_major
    given = None if probs is None else _input(probs)  # [T, E] float32 or None
    weights = None if valid is None else _input(valid, np.float64)  # [T] or None: every token is traffic
    slots = None if indices is None else _input(indices, np.int64)  # [T, k]; else the top-k, piece by piece
    ends = np.append(starts[1:], num_tokens)  # [S]
    compiled = slots is not None and given is None and numba_backend.available()  # the common case, one pass
    if not compiled:
        total, absmax, top_parts = _table_sums(raw, given, scoring, weights, starts, ends, expert_major,
                                               None if slots is not None else top_k)
    if slots is None:
        slots = np.concatenate(top_parts)  # [T, k]
    if slots.ndim != 2 or slots.shape[0] != num_tokens:  # as the reference, which cannot pair them either
        raise ValueError(f"expert ids of shape {tuple(slots.shape)} for {num_tokens} tokens: [T, k] expected")
    if slots.size and (slots.min() < 0 or slots.max() >= num_experts):
        raise IndexError(f"expert ids must lie in [0, {num_experts}), got {slots.min()}..{slots.max()}")

    if compiled:
        whole = dropped is None and capacity_factor <= 0 and ranks is None  # else drops, ranks below
        expert_rows = raw if expert_major else concat_experts([raw])  # [E, T]
        total, absmax, counts, cosel = numba_backend.segment_sums(expert_rows, slots, weights, starts, ends,
                                                                  coselect and whole,
                                                                  scoring_code(scoring) == SIGMOID)
        if whole:
            return [GateSums(total[s, :NUM_SCALARS], total[s, NUM_SCALARS:], counts[s], None, absmax[s],
                             None if cosel is None else cosel[s], None) for s in range(num_segments)]

    traffic = None if weights is None else weights != 0  # [T] bool, or None: every token
    owner = None  # [T'] the segment of each traffic token, or None: one segment
    if num_segments > 1:
        owner = np.repeat(np.arange(num_segments), ends - starts)  # [T]
        owner = owner if traffic is None else owner[traffic]
    chosen = slots if traffic is None else slots[traffic]  # [T', k] the traffic tokens' slots
    keyed = chosen if owner is None else owner[:, None] * num_experts + chosen  # [T', k] (segment, expert)
    if not compiled:  # else the kernel's counts (the same)
        counts = np.bincount(keyed.ravel(), minlength=num_segments * num_experts).reshape(num_segments,
                                                                                          num_experts)
    drops = None
    if dropped is not None:
        lost = _input(dropped, np.int64)  # [T, k]
        if traffic is not None:
            lost = lost[traffic]
        drops = _counts(np.bincount(keyed.ravel(), weights=lost.ravel(), minlength=num_segments * num_experts))
        drops = drops.reshape(num_segments, num_experts)
    elif capacity_factor > 0:
        calls = None if call_ids is None else _input(call_ids, np.int64)
        if calls is not None and traffic is not None:
            calls = calls[traffic]
        drops = would_be_drops(chosen, top_k, capacity_factor, calls, num_calls, num_experts, owner, num_segments)
    cosel = coselection(chosen, num_experts, counts, owner, num_segments) if coselect else None  # [S, E, E]
    touched = None
    if ranks is not None:
        touched = rank_tokens(chosen, _input(ranks, np.int64))[None]  # [1, E]
    return [GateSums(total[s, :NUM_SCALARS], total[s, NUM_SCALARS:], counts[s],
                     None if drops is None else drops[s], absmax[s],
                     None if cosel is None else cosel[s], None if touched is None else touched[s])
            for s in range(num_segments)]


def _table_sums(raw, given, scoring, weights, starts, ends, expert_major, top_k):
    """The float sums of each segment with numpy, piece by piece: float64 [S, C], float64 [S]
    max |logit|, and the top-k of each piece's probabilities ([n, k] arrays) where ``top_k`` is
    given (the router gave no expert ids)."""
    num_tokens, num_experts = raw.shape[::-1] if expert_major else raw.shape
    num_segments = starts.shape[0]
    top_parts = []
    total = np.zeros((num_segments, NUM_SCALARS + num_experts))  # [S, C] float64
    absmax = np.zeros(num_segments)  # [S]
    step = max(MIN_PIECE_TOKENS, PIECE_VALUES // num_experts)
    for first in range(0, num_tokens, step):
        last = min(num_tokens, first + step)
        w = None if weights is None else weights[first:last]  # [n]
        x = raw[:, first:last] if expert_major else raw[first:last].T  # [E, n]
        table, magnitude = _token_stats(x, None if given is None else given[first:last], scoring, w)
        if top_k is not None:  # the reference's top-k on these probabilities, laid out as the reference's
            p = table[NUM_SCALARS:]  # [E, n]
            top_parts.append(torch.topk(torch.from_numpy(p).t(), top_k, dim=-1).indices.numpy())  # [n, k]
        rows, local = _pieces(starts, ends, first, last)  # the segments in this piece, where they start in it
        if w is not None:  # weighted sums in float64, as the reference's (no BLAS: its threads spin)
            table = table.astype(np.float64) * w
        # A piece's sums are pairwise in the table's dtype (float32 unweighted: relative error
        # about 1e-7 over a piece's <= 16k tokens; a cast to float64 tripled their cost), the
        # pieces' in float64. reduceat sums sequentially: in float64 only.
        if rows.shape[0] == 1:  # the common case
            total[rows[0]] += table.sum(axis=1)
            absmax[rows[0]] = max(absmax[rows[0]], float(magnitude.max()))
        elif last - first >= SLICED_SEGMENT_TOKENS * rows.shape[0]:  # a few long segments: slice by slice
            bounds = np.append(local, last - first)  # [S' + 1]
            for row, begin, end in zip(rows.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
                total[row] += table[:, begin:end].sum(axis=1)
                absmax[row] = max(absmax[row], float(magnitude[begin:end].max()))
        else:  # many short segments: one call
            total[rows] += np.add.reduceat(table, local, axis=1, dtype=np.float64).T
            absmax[rows] = np.maximum(absmax[rows], np.maximum.reduceat(magnitude, local))
    return total, absmax, top_parts


def _pieces(starts: np.ndarray, ends: np.ndarray, first: int, last: int):
    """The segments with tokens in [first, last) (ascending) and where each begins in it."""
    rows = np.nonzero((starts < last) & (ends > first) & (ends > starts))[0]  # [S'] non-empty, overlapping
    return rows, np.maximum(starts[rows] - first, 0)


def _token_stats(x: np.ndarray, given: Optional[np.ndarray], scoring, weights: Optional[np.ndarray]):
    """The per-token quantities of a piece of n tokens: [NUM_SCALARS + E, n] float32, layout's
    columns in its order then the routing distribution p; and [n] the |logit| maximum per token
    (weighted, as the reference's absmax). ``x`` [E, n] float32 logits, ``given`` [n, E] router
    probabilities or None, ``weights`` [n] float64 or None."""
    if x.strides[1] != x.itemsize:  # reductions over the experts run across contiguous rows
        x = np.ascontiguousarray(x)
    num_experts, num_tokens = x.shape
    table = np.empty((NUM_SCALARS + num_experts, num_tokens), dtype=np.float32)  # [C, n], filled below
    p = table[NUM_SCALARS:]  # [E, n]
    token_sum = np.sum(x, axis=0, out=table[LOGIT_SUM])  # [n]
    nonfinite_count = table[NONFINITE]  # [n]
    nonfinite_count[:] = 0
    if not np.isfinite(token_sum).all():  # some NaN or +-Inf (or a sum that overflowed): replace by 0
        bad = ~np.isfinite(x)  # [E, n]
        np.sum(bad, axis=0, dtype=np.float32, out=nonfinite_count)
        x = np.where(bad, np.float32(0), x)  # [E, n]
        np.sum(x, axis=0, out=token_sum)
    peak = x.max(axis=0)  # [n]
    shifted = x - peak  # [E, n], <= 0
    exp_shifted = np.exp(shifted)  # [E, n]
    norm = exp_shifted.sum(axis=0)  # [n]
    log_norm = np.log(norm)  # [n]
    lse = peak + log_norm  # [n] logsumexp of the logits
    if given is None and scoring_code(scoring) == SOFTMAX:
        np.divide(exp_shifted, norm, out=p)
        np.subtract(log_norm, (p * shifted).sum(axis=0), out=table[ENTROPY])  # -sum p log p
    else:
        if given is None:  # sigmoid scores, normalised per token
            scores = np.float32(1) / (np.float32(1) + np.exp(-x))  # [E, n]
            np.divide(scores, np.maximum(scores.sum(axis=0), np.float32(1e-30)), out=p)
        else:
            p[:] = np.nan_to_num(given, nan=0.0, posinf=0.0, neginf=0.0).T
        np.sum(entr(p), axis=0, out=table[ENTROPY])
    # the top two probabilities: the second is the max of the others (0 for none, as the
    # reference's), or the top itself where two share the top (p has no NaN)
    if num_experts <= 16:  # a running top two over the expert rows: fewer passes than a mask
        top1, second = p[0].copy(), np.zeros(num_tokens, dtype=np.float32)  # [n], [n]
        for row in p[1:]:
            np.maximum(second, np.minimum(top1, row), out=second)
            np.maximum(top1, row, out=top1)
    else:
        top1 = p.max(axis=0)  # [n]
        below = p < top1  # [E, n]: the experts that are not at the top
        second = (p * below).max(axis=0)  # [n]
        second = np.where(below.sum(axis=0, dtype=np.int32) <= num_experts - 2, top1, second)  # [n]
    table[TOKENS] = 1
    np.sum(np.square(x), axis=0, out=table[LOGIT_SQSUM])
    np.subtract(np.float32(num_experts), nonfinite_count, out=table[LOGIT_FINITE])
    table[TOP1] = top1
    np.subtract(top1, second, out=table[MARGIN])
    np.multiply(lse, lse, out=table[ZLOSS])
    if weights is None:
        magnitude = np.maximum(peak, -x.min(axis=0))  # [n] max |x|, one pass less than abs()
    else:
        magnitude = (np.abs(x) * weights.astype(np.float32)).max(axis=0)  # [n]
    return table, magnitude


def _counts(float_counts: np.ndarray) -> np.ndarray:
    """int64 counts that ``bincount`` with weights returned as float64 (exact below 2**53)."""
    return np.rint(float_counts).astype(np.int64)


def coselection(chosen: np.ndarray, num_experts: int, diagonal: np.ndarray, owner: Optional[np.ndarray] = None,
                num_segments: int = 1) -> np.ndarray:
    """int64 [S, E, E] upper triangles: :func:`reference.coselection` of the traffic tokens' slots
    ``chosen`` [T', k] (a token's experts are a set: a repeated id counts once), per segment
    (``owner`` [T']: each token's segment; None: one). ``diagonal`` [S, E]: the slots naming
    each expert, as the caller counted them (the diagonal where no token repeats an id)."""
    num_tokens, k = chosen.shape
    size = num_experts * num_experts
    ids = np.ascontiguousarray(chosen.T)  # [k, T']
    keep = None  # [k, T'] the first slot naming its expert, or None: a token's ids are distinct
    for later in range(1, k):
        repeated = (ids[:later] == ids[later]).any(axis=0)  # [T']
        if repeated.any():
            if keep is None:
                keep = np.ones((k, num_tokens), dtype=bool)
            keep[later] = ~repeated
    if keep is None:
        return _distinct_coselection(ids, num_experts, owner, num_segments, diagonal)
    base = None if owner is None else owner * size  # [T'] each segment's pairs in a square of its own
    parts = []
    for a in range(k):  # (a, a): tokens that chose ids[a]; (a, b): pairs at (min id, max id)
        for b in range(a, k):
            flat = ids[a] * (num_experts + 1) if a == b else (
                np.minimum(ids[a], ids[b]) * num_experts + np.maximum(ids[a], ids[b]))  # [T']
            if base is not None:
                flat = flat + base
            flat = flat[keep[a] & keep[b]]
            parts.append(flat)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=num_segments * size).reshape(num_segments, num_experts, num_experts)


def _distinct_coselection(ids: np.ndarray, num_experts: int, owner: Optional[np.ndarray], num_segments: int,
                          diagonal: np.ndarray) -> np.ndarray:
    """:func:`coselection` where no token names an expert twice (every router's top-k): each
    ordered pair of slots (a < b) counted at (ids[a], ids[b]) in one pass, then folded onto the
    upper triangle; the diagonal is ``diagonal``, the tokens per expert. ``ids`` [k, T']. Fewer
    passes than ordering every pair (min and max) and counting the diagonal's slots with them.
    The keys are written in place, a slot against all later ones per op: k - 1 adds, not
    k (k - 1) / 2 of each op and a concatenation (8,192 tokens of 64 experts, top-8, 4 segments:
    0.62 ms, not 0.90)."""
    k, num_tokens = ids.shape
    size = num_experts * num_experts
    # [k - 1, T'] the (segment, first id) part of a key, for each slot but the last
    high = ids[:-1] * num_experts if owner is None else ids[:-1] * num_experts + owner * size
    flat = np.empty((k * (k - 1) // 2, num_tokens), dtype=np.int64)  # [P, T'] a row per pair of slots
    row = 0
    for a in range(k - 1):  # slot a against each later slot b: key (segment, ids[a], ids[b])
        np.add(high[a], ids[a + 1:], out=flat[row:row + k - 1 - a])
        row += k - 1 - a
    ordered = np.bincount(flat.ravel(), minlength=num_segments * size).reshape(num_segments, num_experts,
                                                                                num_experts)
    pairs = np.triu(ordered + ordered.transpose(0, 2, 1), 1)  # [S, E, E] strictly upper
    experts = np.arange(num_experts)
    pairs[:, experts, experts] = diagonal
    return pairs


def rank_tokens(chosen: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """int64 [E]: :func:`reference.rank_tokens` of the traffic tokens' slots ``chosen`` [T', k]."""
    on = np.sort(ranks[chosen], axis=1)  # [T', k] ranks of the chosen experts, ascending
    first = np.ones(on.shape, dtype=bool)  # [T', k] the first slot naming its rank
    first[:, 1:] = on[:, 1:] != on[:, :-1]
    return np.bincount(on[first], minlength=ranks.shape[0]).astype(np.int64, copy=False)


def would_be_drops(chosen: np.ndarray, top_k: int, capacity_factor: float, calls: Optional[np.ndarray],
                   num_calls: int, num_experts: int, owner: Optional[np.ndarray] = None,
                   num_segments: int = 1) -> np.ndarray:
    """int64 [S, E]: :func:`reference.would_be_drops` of the traffic tokens' slots ``chosen``
    [T', k] and their calls [T'] (None: one call), per segment (``owner`` [T'], None: one)."""
    if calls is None:
        calls = np.zeros(chosen.shape[0], dtype=np.int64)
    per_call = np.bincount((calls[:, None] * num_experts + chosen).ravel(),
                           minlength=num_calls * num_experts)  # [N*E]
    tokens = np.bincount(calls, minlength=num_calls).astype(np.float64)  # [N]
    # float64 in the reference's order: the capacity equals math.ceil on the host
    capacity = np.ceil(tokens * top_k / num_experts * capacity_factor)  # [N]
    over = np.maximum(per_call.reshape(num_calls, num_experts) - capacity[:, None], 0.0)  # [N, E]
    call_segment = np.zeros(num_calls, dtype=np.int64)  # [N] (a call without traffic adds 0 anywhere)
    if owner is not None:
        call_segment[calls] = owner
    keyed = (call_segment[:, None] * num_experts + np.arange(num_experts)).ravel()  # [N*E]
    return _counts(np.bincount(keyed, weights=over.ravel(), minlength=num_segments * num_experts)).reshape(
        num_segments, num_experts)
