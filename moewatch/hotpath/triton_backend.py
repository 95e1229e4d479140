"""The CUDA backend of the hot path: one Triton kernel launch per gate call.

``observe`` adds to gate ``row`` of the accumulators (see ``layout``) what
``reference.accumulate(..., reference.gate_sums(...))`` adds for the call, with device atomics.
It reads no value back to the host and allocates nothing per call (scratch is cached per device
and width), so the launch can be captured in a CUDA graph; every host-side decision depends on
shapes, dtypes and Python arguments only. T = 0 launches nothing.

Kernel structure
----------------
- Tiles: a program handles ``BLOCK_T`` tokens x ``E_PAD`` experts at a time (``E_PAD`` = E
  padded to a power of two, 2..256; padded columns are masked). On CUDA a tile is at most 1024
  elements (8 per thread on up to 4 warps) and 4 tokens (128 for calls with would-be drops, so
  that decode-sized ones run in one program), and no larger than T needs.
- Grid: ``min(blocks, cap)`` programs (``cap`` = 4 per SM on CUDA); each program loops over
  every ``num_programs``-th block and keeps its partial sums in registers (float64 scalars and
  per-expert float64 vectors for the weighted sums, int32 for counts), so a call costs one set
  of atomics per program, not per block.
- Per token (float32, as the reference): non-finite logits become 0 (nan_to_num), then
  logsumexp, entropy (softmax: log_norm - sum p * shifted; sigmoid scores normalised per token
  or router-given probabilities: -sum p log p with 0 log 0 = 0), logit sum, sum of squares,
  finite and non-finite counts, top-1, margin to the second (0 on a shared maximum), z-loss.
  Token weights: ``valid`` (an override), else the root call's padding mask read in the kernel
  at [b, L - S + s] for token t (or ``positions[t]``) = b * S + s, else 1. Each per-token value
  is converted to float64 and multiplied by its weight, as the reference's ``table @ w``.
- Counts: the router's indices, or (indices None) the top-k of the routing distribution taken
  in the kernel by k rounds of arg-max; exact ties go to the lowest expert id.
- Atomics, at the end of each program: float64 ``atomic_add`` of the 9 scalar sums and the E
  probability sums, int64 ``atomic_add`` of counts and native drops (exact), and an int64
  ``atomic_max`` of max |finite logit| * w on the bit pattern of the float64 ``absmax`` (the
  value is >= 0, where IEEE order and two's-complement order agree).
- Would-be drops (capacity factor > 0, no native drops) need the whole call's per-expert counts
  before any drop is known. With one program (decode-sized calls) the program has them. With
  several, each program adds its counts and its traffic-token count into a scratch buffer
  cached per (device, E_PAD), then draws a ticket with an atomic add; the program that draws
  the last ticket reads the buffer back with atomic exchanges (which also reset it to 0), adds
  max(count - ceil(tokens * k / E * cf), 0) per expert into the drops row (float64, in the
  reference's order; cf is a compile-time constant so it is not rounded to float32) and puts
  the ticket back to 0, all in the same launch. The buffer is shared by the launches of one
  stream in order: two launches with capacity drops and the same E_PAD must not run
  concurrently on two streams of one device. ``reserve`` allocates it ahead of graph capture.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .layout import (ENTROPY, FUSED_MAX_EXPERTS, LOGIT_FINITE, LOGIT_SQSUM, LOGIT_SUM, MARGIN, NONFINITE, NUM_SCALARS,
                     SIGMOID, SOFTMAX, TOKENS, TOP1, ZLOSS)
from .reference import mask_columns, scoring_code

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except Exception:  # any import failure (absent, broken CUDA toolchain) means no Triton backend
    triton = tl = None
    AVAILABLE = False

MAX_EXPERTS = FUSED_MAX_EXPERTS
MAX_SLOTS = 8
# Elements per [BLOCK_T, E_PAD] tile and the most tokens per block. CUDA: at most 1024 elements on up
# to 4 warps, 8 per thread; ptxas (sm_90) then reports no spills for the heaviest variant (top-8 taken
# in the kernel, mask with positions, capacity drops) at E_PAD 8, 64, 256, where 16 per thread spilled.
# And at most 4 tokens a block: a call's tokens spread over more programs, each with short reductions,
# beats few programs with long ones. Measured on an H200 in CUDA graphs (benchmarks/gpu_tile_probe.py),
# GPU us per call at most 128 / 8 / 4 tokens a block: E 8, T 64: 7.45 / 2.41 / 1.94; E 64 k 8, T 64:
# 10.4 / 8.7 / 6.3; T 1 unchanged; prefill (T 8192) E 8: 11.4 / 7.5 / 7.7, E 64: 24.9 / 23.4 / 25.7.
# CPU (the interpreter, which pays per operation, not per element): large tiles, a few blocks a call.
_TILE = {"cuda": (1024, 4), "cpu": (1 << 16, 8192)}
# Calls with would-be drops (capacity factor, no native drops) take up to this many tokens a block, so
# that a decode-sized one runs in one program: several share a scratch buffer per device (see
# "Would-be drops" above), which two streams must not use at once.
_ONE_PROGRAM_TOKENS = 128

# The kernel writes the scalar columns by literal position (0..8, then 9 + expert).
if (TOKENS, ENTROPY, LOGIT_SUM, LOGIT_SQSUM, LOGIT_FINITE, TOP1, MARGIN, ZLOSS, NONFINITE) != tuple(range(9)) \
        or NUM_SCALARS != 9:
    raise ImportError("moewatch.hotpath.layout changed its scalar columns: update the Triton kernel's order")

# Token weights: the valid override, the padding mask, or none (every token counts).
_W_NONE, _W_VALID, _W_MASK = 0, 1, 2

if AVAILABLE:
    # Shape-dependent integers are not specialised (no recompile when T or the row changes
    # divisibility); strides are (a unit stride makes loads vectorisable).
    @triton.jit(do_not_specialize=["num_tokens", "blocks_per_program", "sums_off", "counts_off", "absmax_off",
                                   "seq", "mask_col0", "grid_width", "cosel_off", "ranks_off"])
    def _observe_kernel(
        logits_ptr, probs_ptr, idx_ptr, drop_ptr, valid_ptr, mask_ptr, pos_ptr,
        sums_ptr, counts_ptr, absmax_bits_ptr, scratch_ptr, cosel_ptr, ranks_ptr,
        num_tokens, num_experts, blocks_per_program,
        s_lt, s_le, s_pt, s_pe, s_it, s_ik, s_dt, s_dk, s_v, s_mb, s_ml, s_pos,
        sums_off, s_sc, counts_off, s_ck, s_ce, absmax_off,
        seq, mask_col0, grid_width,
        cosel_off, s_xi, s_xj, ranks_off, s_r,
        SCORING: tl.constexpr, HAS_PROBS: tl.constexpr, HAS_INDICES: tl.constexpr, HAS_DROPPED: tl.constexpr,
        WEIGHTS: tl.constexpr, HAS_POSITIONS: tl.constexpr, K_SLOTS: tl.constexpr, TOP_K: tl.constexpr,
        CAPACITY: tl.constexpr, SHARED_DROPS: tl.constexpr, CF: tl.constexpr,
        COSEL: tl.constexpr, RANKS: tl.constexpr,
        BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, E_PAD)  # [EP] expert ids
        in_col = cols < num_experts  # [EP] real experts
        lanes = tl.arange(0, BLOCK_T)  # [BT]
        # This program's partial sums, kept in registers over its blocks: float64 scalars (a [BT]
        # vector would be held whole by every thread that shares a token), per-expert vectors.
        # (tl.full, not tl.zeros: the same code, but a builtin the interpreter does not re-patch per call.)
        c_tokens = tl.full([], 0, tl.float64)  # [] sum of w
        c_entropy = tl.full([], 0, tl.float64)  # []
        c_lsum = tl.full([], 0, tl.float64)  # []
        c_lsq = tl.full([], 0, tl.float64)  # []
        c_finite = tl.full([], 0, tl.float64)  # []
        c_top1 = tl.full([], 0, tl.float64)  # []
        c_margin = tl.full([], 0, tl.float64)  # []
        c_zloss = tl.full([], 0, tl.float64)  # []
        c_nonfinite = tl.full([], 0, tl.float64)  # []
        c_traffic = tl.full([], 0, tl.int32)  # [] tokens with weight != 0
        c_amax = tl.full([], 0, tl.float32)  # [] max weighted |finite logit|
        psum = tl.full([E_PAD], 0, tl.float64)  # [EP] weighted probability sums
        cnt = tl.full([E_PAD], 0, tl.int32)  # [EP] assignments of traffic tokens
        drp = tl.full([E_PAD], 0, tl.int32)  # [EP] native drops of traffic tokens
        chosen_by = tl.full([E_PAD], 0, tl.int32)  # [EP] traffic tokens that chose the expert (co-selection diagonal)
        on_rank = tl.full([E_PAD], 0, tl.int32)  # [EP] traffic tokens with an expert on rank r (column r)

        for i in range(0, blocks_per_program):
            toks = (pid + i * nprog) * BLOCK_T + lanes  # [BT] token ids (blocks past T are fully masked)
            in_tok = toks < num_tokens  # [BT]
            t64 = toks.to(tl.int64)  # [BT] 64-bit offsets: T*E may pass 2**31
            tile = in_tok[:, None] & in_col[None, :]  # [BT, EP]

            # -- token weights (reference: valid, else mask_weights, else 1) --
            if WEIGHTS == 1:  # valid override: bool (as uint8) or 0/1 float, summed as float64
                w = tl.load(valid_ptr + t64 * s_v, mask=in_tok, other=0).to(tl.float64)  # [BT]
            elif WEIGHTS == 2:  # padding mask [B, L]: grid place pos reads mask[pos // S, L - S + pos % S]
                if HAS_POSITIONS:
                    pos = tl.load(pos_ptr + t64 * s_pos, mask=in_tok, other=-1).to(tl.int64)  # [BT]
                else:
                    pos = t64  # [BT]
                on_grid = in_tok & (pos >= 0) & (pos < grid_width)  # [BT] off-grid places are never read
                m = tl.load(mask_ptr + (pos // seq) * s_mb + (mask_col0 + pos % seq) * s_ml,
                            mask=on_grid, other=0)  # [BT]
                w = tl.where(m != 0, 1.0, 0.0).to(tl.float64)  # [BT]
            else:
                w = tl.full([BLOCK_T], 1.0, tl.float64)  # [BT]
            w = tl.where(in_tok, w, 0.0)  # [BT] float64, 0 past T
            traffic = in_tok & (w != 0)  # [BT] tokens whose assignments count
            c_traffic += tl.sum(traffic.to(tl.int32), axis=0)

            # -- logits: upcast, non-finite -> 0 (nan_to_num) --
            raw = tl.load(logits_ptr + t64[:, None] * s_lt + cols[None, :] * s_le,
                          mask=tile, other=0.0).to(tl.float32)  # [BT, EP]
            finite = tl.abs(raw) < float("inf")  # [BT, EP] False for NaN and +-Inf
            x = tl.where(finite, raw, 0.0)  # [BT, EP] padded cells are 0
            nonfinite = tl.sum(tl.where(finite, 0.0, 1.0), axis=1)  # [BT]
            peak = tl.max(tl.where(in_col[None, :], x, float("-inf")), axis=1)  # [BT]
            shifted = x - peak[:, None]  # [BT, EP] <= 0 on real experts
            ex = tl.where(in_col[None, :], tl.exp(shifted), 0.0)  # [BT, EP]
            denom = tl.sum(ex, axis=1)  # [BT] >= 1
            log_norm = tl.log(denom)  # [BT]
            lse = peak + log_norm  # [BT] logsumexp

            # -- routing distribution and its entropy --
            if HAS_PROBS or SCORING == 1:
                if HAS_PROBS:
                    pr = tl.load(probs_ptr + t64[:, None] * s_pt + cols[None, :] * s_pe,
                                 mask=tile, other=0.0).to(tl.float32)  # [BT, EP]
                    p = tl.where(tl.abs(pr) < float("inf"), pr, 0.0)  # [BT, EP] nan_to_num, not renormalised
                else:
                    # sigmoid written out (what tl.sigmoid computes), 0 on padded experts
                    sc = tl.where(in_col[None, :], 1.0 / (1.0 + tl.exp(-x)), 0.0)  # [BT, EP]
                    p = sc / tl.maximum(tl.sum(sc, axis=1), 1e-30)[:, None]  # [BT, EP] normalised per token
                # entr(p): -p log p for p > 0, 0 at 0, -inf below (torch.special.entr); log(1) avoids log(0)
                plogp = p * tl.log(tl.where(p > 0, p, 1.0))  # [BT, EP]
                entropy = tl.sum(tl.where(p >= 0, -plogp, float("-inf")), axis=1)  # [BT]
            else:
                p = ex / denom[:, None]  # [BT, EP] softmax
                entropy = log_norm - tl.sum(p * shifted, axis=1)  # [BT]: log p = shifted - log_norm

            # -- top-1 and margin: the second is the max with one top-1 taken out, so a shared maximum
            #    gives second = top1; otherwise max(others, 0), as the reference's where(at_top, 0, p) --
            cand = tl.where(in_col[None, :], p, float("-inf"))  # [BT, EP] candidates
            top1, first = tl.max(cand, axis=1, return_indices=True, return_indices_tie_break_left=True)  # [BT] x2
            cand = tl.where(cols[None, :] == first[:, None], float("-inf"), cand)  # [BT, EP] top-1 taken
            rest = tl.max(cand, axis=1)  # [BT] -inf when E = 1
            second = tl.where(rest == top1, top1, tl.maximum(rest, 0.0))  # [BT]

            # -- weighted sums in float64 (value * w, as the reference's table @ w; lanes past T excluded) --
            c_tokens += tl.sum(w, axis=0)
            c_entropy += tl.sum(tl.where(in_tok, entropy.to(tl.float64) * w, 0.0), axis=0)
            c_lsum += tl.sum(tl.where(in_tok, tl.sum(x, axis=1).to(tl.float64) * w, 0.0), axis=0)
            c_lsq += tl.sum(tl.where(in_tok, tl.sum(x * x, axis=1).to(tl.float64) * w, 0.0), axis=0)
            c_finite += tl.sum(tl.where(in_tok, (num_experts - nonfinite).to(tl.float64) * w, 0.0), axis=0)
            c_top1 += tl.sum(tl.where(in_tok, top1.to(tl.float64) * w, 0.0), axis=0)
            c_margin += tl.sum(tl.where(in_tok, (top1 - second).to(tl.float64) * w, 0.0), axis=0)
            c_zloss += tl.sum(tl.where(in_tok, (lse * lse).to(tl.float64) * w, 0.0), axis=0)
            c_nonfinite += tl.sum(tl.where(in_tok, nonfinite.to(tl.float64) * w, 0.0), axis=0)
            psum += tl.sum(tl.where(tile, p.to(tl.float64) * w[:, None], 0.0), axis=0)  # [EP]
            # reference: amax(|x| * w) in float32
            c_amax = tl.maximum(c_amax, tl.max(tl.max(tl.where(tile, tl.abs(x) * w.to(tl.float32)[:, None], 0.0),
                                                      axis=1), axis=0))

            # -- assignments: the router's indices, or the top-k of p (k rounds of arg-max, ties to the
            #    lowest expert id); one-hot hits of all slots, reduced over tokens once per block --
            hits = tl.full([BLOCK_T, E_PAD], 0, tl.int32)  # [BT, EP] assignments per token and expert
            if HAS_DROPPED:
                dhits = tl.full([BLOCK_T, E_PAD], 0, tl.int32)  # [BT, EP] dropped ones
            for j in tl.static_range(K_SLOTS):
                if HAS_INDICES:
                    e = tl.load(idx_ptr + t64 * s_it + j * s_ik, mask=in_tok, other=-1).to(tl.int32)  # [BT]
                elif j == 0:
                    e = first  # [BT]
                else:
                    _, e = tl.max(cand, axis=1, return_indices=True, return_indices_tie_break_left=True)  # [BT]
                    cand = tl.where(cols[None, :] == e[:, None], float("-inf"), cand)  # [BT, EP] taken
                hit = traffic[:, None] & (cols[None, :] == e[:, None])  # [BT, EP] one-hot of slot j
                hits += hit.to(tl.int32)
                if HAS_DROPPED:
                    d = tl.load(drop_ptr + t64 * s_dt + j * s_dk, mask=in_tok, other=0)  # [BT]
                    dhits += (hit & (d != 0)[:, None]).to(tl.int32)
            cnt += tl.sum(hits, axis=0)  # [EP]
            if HAS_DROPPED:
                drp += tl.sum(dhits, axis=0)  # [EP]

            # -- placement statistics, from each traffic token's chosen experts as a set --
            if COSEL or RANKS:
                rest = (hits > 0) & in_col[None, :]  # [BT, EP] chosen experts not yet visited
                if COSEL:
                    chosen_by += tl.sum(rest.to(tl.int32), axis=0)  # [EP]
                if RANKS:
                    seen = tl.full([BLOCK_T, E_PAD], 0, tl.int32)  # [BT, EP] 1: the token reaches rank (column)
                # visit each token's experts in ascending order (k rounds of min): the pairs (e, later)
                # are the co-selection's upper triangle, added by one masked atomic per pair
                for j in tl.static_range(K_SLOTS):
                    e = tl.min(tl.where(rest, cols[None, :], E_PAD), axis=1)  # [BT] E_PAD: none left
                    has = e < E_PAD  # [BT]
                    rest = rest & (cols[None, :] != e[:, None])  # [BT, EP]
                    if COSEL:
                        if j < K_SLOTS - 1:
                            tl.atomic_add(cosel_ptr + cosel_off + e.to(tl.int64)[:, None] * s_xi + cols[None, :] * s_xj,
                                          tl.full([BLOCK_T, E_PAD], 1, tl.int64), mask=rest & has[:, None],
                                          sem="relaxed")  # [BT, EP]
                    if RANKS:
                        r = tl.load(ranks_ptr + ranks_off + e.to(tl.int64) * s_r, mask=has, other=-1)  # [BT]
                        seen = tl.maximum(seen, ((cols[None, :] == r[:, None]) & has[:, None]).to(tl.int32))  # [BT, EP]
                if RANKS:
                    on_rank += tl.sum(seen, axis=0)  # [EP]

        # -- one set of atomics per program: relaxed (sums that nothing in this launch reads back; the
        #    launch's end makes them visible), not the default acq_rel, whose fences cost each one --
        s16 = tl.arange(0, 16)  # [16] scalar-column ids, layout order (9 used)
        scal = tl.where(s16 == 0, c_tokens, tl.where(s16 == 1, c_entropy, tl.where(s16 == 2, c_lsum, tl.where(
            s16 == 3, c_lsq, tl.where(s16 == 4, c_finite, tl.where(s16 == 5, c_top1, tl.where(
                s16 == 6, c_margin, tl.where(s16 == 7, c_zloss, tl.where(s16 == 8, c_nonfinite, 0.0)))))))))  # [16]
        tl.atomic_add(sums_ptr + sums_off + s16 * s_sc, scal, mask=s16 < 9, sem="relaxed")  # [16] scalar columns
        tl.atomic_add(sums_ptr + sums_off + (9 + cols) * s_sc, psum, mask=in_col, sem="relaxed")  # [EP] probability sums
        tl.atomic_add(counts_ptr + counts_off + cols * s_ce, cnt.to(tl.int64), mask=in_col, sem="relaxed")  # [EP] assignments
        if HAS_DROPPED:
            tl.atomic_add(counts_ptr + counts_off + s_ck + cols * s_ce, drp.to(tl.int64), mask=in_col, sem="relaxed")  # [EP]
        if COSEL:  # the diagonal: [e, e] at e * (s_xi + s_xj)
            tl.atomic_add(cosel_ptr + cosel_off + cols * (s_xi + s_xj), chosen_by.to(tl.int64), mask=in_col,
                          sem="relaxed")  # [EP]
        if RANKS:  # counts row 2 (RANK_TOKENS), column r
            tl.atomic_add(counts_ptr + counts_off + 2 * s_ck + cols * s_ce, on_rank.to(tl.int64), mask=in_col,
                          sem="relaxed")  # [EP]
        top = c_amax.to(tl.float64)  # [] >= 0
        tl.atomic_max(absmax_bits_ptr + absmax_off, top.to(tl.int64, bitcast=True), sem="relaxed")  # int order == float order

        # -- would-be drops: capacity from the whole call's counts --
        if CAPACITY:
            calls = cnt.to(tl.int64)  # [EP]
            tokens = c_traffic.to(tl.int64)  # []
            if SHARED_DROPS:
                tl.atomic_add(scratch_ptr + cols, calls, mask=in_col)  # [EP] pooled counts of the call
                tl.atomic_add(scratch_ptr + E_PAD, tokens)  # [] pooled traffic tokens
                tl.debug_barrier()  # every thread's adds precede the ticket (acq_rel atomics order the rest)
                ticket = tl.atomic_add(scratch_ptr + E_PAD + 1, 1)  # [] programs finished before this one
                last = ticket == nprog - 1  # [] this program finishes the call
                # a comparison, not in_col & last: the interpreter's atomics want a bool mask
                calls = tl.atomic_xchg(scratch_ptr + cols, 0, mask=cols < tl.where(last, num_experts, 0))  # [EP]
                tokens = tl.atomic_xchg(scratch_ptr + E_PAD, 0, mask=last)  # [] read and reset
            else:
                last = pid == 0  # [] the only program
            # float64 in the reference's order: ceil(tokens * k / E * cf)
            capacity = tl.ceil(tokens.to(tl.float64) * TOP_K / num_experts * CF)  # []
            over = tl.maximum(calls.to(tl.float64) - capacity, 0.0).to(tl.int64)  # [EP]
            tl.atomic_add(counts_ptr + counts_off + s_ck + cols * s_ce, over,
                          mask=cols < tl.where(last, num_experts, 0))  # [EP] the finishing program only
            if SHARED_DROPS:
                tl.atomic_xchg(scratch_ptr + E_PAD + 1, 0, mask=last)  # ticket back to 0 for the next call

    _kernel = _observe_kernel
else:
    _kernel = None


def next_pow2(n: int) -> int:
    """The least power of two >= n (n >= 1): triton.next_power_of_2 in plain Python, which costs
    a launch microseconds less than calling Triton's helper."""
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Cached per device / (device, E_PAD): never allocated per call.
_SCRATCH: Dict[Tuple[torch.device, int], torch.Tensor] = {}
_PROGRAM_CAP: Dict[torch.device, int] = {}


def _program_cap(device: torch.device) -> int:
    cap = _PROGRAM_CAP.get(device)
    if cap is None:
        if device.type == "cuda":
            cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        else:  # the interpreter: a few programs so the block loop and the ticket are exercised
            cap = 4
        _PROGRAM_CAP[device] = cap
    return cap


def _scratch(device: torch.device, e_pad: int) -> torch.Tensor:
    """int64 [E_PAD + 2]: pooled per-expert counts, pooled traffic tokens, ticket; all 0 between launches."""
    buf = _SCRATCH.get((device, e_pad))
    if buf is None:
        buf = torch.zeros(e_pad + 2, dtype=torch.int64, device=device)
        _SCRATCH[(device, e_pad)] = buf
    return buf


def reserve(device, num_experts: int) -> None:
    """Allocate the cached buffers of gates with ``num_experts`` experts on ``device`` now.

    Call it before capturing a CUDA graph: a buffer first allocated inside a capture is zeroed
    by the graph, not before it. Eager calls allocate on first use anyway.
    """
    if not AVAILABLE:
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the key observe uses: the tensor's own device
        device = torch.device("cuda", torch.cuda.current_device())
    _program_cap(device)
    _scratch(device, max(2, next_pow2(num_experts)))


def _mask_plan(mask: Optional[torch.Tensor], num_tokens: int, positions: Optional[torch.Tensor],
               grid: int) -> Optional[Tuple[int, int, int]]:
    """(S, L - S, grid width) when the padding mask applies to this call, else None (every token counts).

    Shapes only, the same decision as ``reference.mask_weights``.
    """
    seq = mask_columns(mask, num_tokens, positions, grid)
    if seq is None:
        return None
    width = grid if positions is not None else num_tokens
    return max(seq, 1), mask.shape[1] - seq, width  # seq 0 only with an empty grid, where no place is on it


def _as_loadable(t: torch.Tensor) -> torch.Tensor:
    # bool tensors are read as their bytes (a view, no copy)
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _pointer(t: Optional[torch.Tensor], dims: int, stand_in: torch.Tensor):
    """(tensor, its strides) for a kernel argument; None: a stand-in pointer, never read, and 0 strides."""
    if t is None:
        return stand_in, (0,) * dims
    t = _as_loadable(t)
    return t, t.stride()


def observe(logits: torch.Tensor, indices: Optional[torch.Tensor], probs: Optional[torch.Tensor],
            dropped: Optional[torch.Tensor], valid: Optional[torch.Tensor], mask: Optional[torch.Tensor],
            positions: Optional[torch.Tensor], grid: int, sums: torch.Tensor, counts: torch.Tensor,
            absmax: torch.Tensor, row: int, top_k: int, scoring: int, capacity_factor: float,
            cosel: Optional[torch.Tensor] = None, ranks: Optional[torch.Tensor] = None) -> None:
    """Add one gate call's statistics into gate ``row`` of the accumulators with one kernel launch.

    logits [T, E] fp16/bf16/fp32 (any strides); indices [T, k] int32/int64 or None (then the
    top-k of the routing distribution, exact ties to the lowest expert id); probs [T, E] or None;
    dropped [T, k] bool or None; valid [T] bool / 0-1 float or None (overrides the mask); mask
    [B, L] of the root call or None, with positions [T] int64 or None into a grid of ``grid``
    tokens; sums float64 [G, NUM_SCALARS + E_max], counts int64 [G, 2, E_max], absmax float64
    [G] (all on the logits' device). cosel int64 [G, E_max, E_max] or None: the co-selection
    (upper triangle, see ``layout``) is added there too; ranks int64 [G, E_max] or None: the rank
    of each expert of gate ``row`` (in [0, E)), and the traffic tokens per rank go into counts row
    2 (which counts must then have). T = 0 launches nothing.
    """
    if not AVAILABLE:
        raise RuntimeError("moewatch's Triton backend needs triton, which is not importable here")
    num_tokens, num_experts = logits.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"the Triton backend supports 1..{MAX_EXPERTS} experts, not {num_experts}")
    if sums.dtype != torch.float64 or counts.dtype != torch.int64 or absmax.dtype != torch.float64:
        raise TypeError("accumulators must be sums float64, counts int64, absmax float64 (see moewatch.hotpath.layout)")
    if num_experts > min(sums.shape[1] - NUM_SCALARS, counts.shape[2]) or not 0 <= row < sums.shape[0]:
        raise ValueError(f"gate row {row} with {num_experts} experts does not fit the accumulators")
    if cosel is not None and (cosel.dtype != torch.int64 or cosel.dim() != 3 or row >= cosel.shape[0]
                              or num_experts > min(cosel.shape[1], cosel.shape[2])):
        raise ValueError(f"cosel must be int64 [G, E_max, E_max] with room for gate row {row} and {num_experts} experts")
    if ranks is not None and (ranks.dtype != torch.int64 or ranks.dim() != 2 or row >= ranks.shape[0]
                              or num_experts > ranks.shape[1] or counts.shape[1] < 3):
        raise ValueError(f"ranks must be int64 [G, E_max] with room for gate row {row} and {num_experts} experts, "
                         "and counts must have the rank row (see moewatch.hotpath.layout)")
    launch(logits, indices, probs, dropped, valid, mask, positions, grid, sums, counts, absmax, row, top_k, scoring,
           capacity_factor, cosel, ranks)


def launch(logits: torch.Tensor, indices: Optional[torch.Tensor], probs: Optional[torch.Tensor],
           dropped: Optional[torch.Tensor], valid: Optional[torch.Tensor], mask: Optional[torch.Tensor],
           positions: Optional[torch.Tensor], grid: int, sums: torch.Tensor, counts: torch.Tensor,
           absmax: torch.Tensor, row: int, top_k: int, scoring: int, capacity_factor: float,
           cosel: Optional[torch.Tensor] = None, ranks: Optional[torch.Tensor] = None) -> None:
    """``observe`` without checking the accumulators against the call: for a caller that made
    them for its gates (``device.DeviceBank``), where each check costs the forward's thread
    time at every gate call. The call's own top-k is still checked."""
    num_tokens, num_experts = logits.shape
    k_slots = top_k if indices is None else indices.shape[1]
    if not 1 <= k_slots <= MAX_SLOTS or (indices is None and top_k > num_experts):
        raise ValueError(f"top-k must be 1..min({MAX_SLOTS}, E), not {k_slots} with E = {num_experts}")
    if num_tokens == 0:
        return  # the reference adds zeros (and max with 0 leaves absmax >= 0 unchanged)

    device = logits.device
    capacity_factor = float(capacity_factor or 0.0)
    capacity = dropped is None and capacity_factor > 0
    e_pad = max(2, next_pow2(num_experts))
    tile, max_block_t = _TILE.get(device.type, _TILE["cuda"])
    if capacity:  # decode-sized calls with would-be drops stay in one program: no shared scratch
        max_block_t = max(max_block_t, _ONE_PROGRAM_TOKENS)
    block_t = max(1, min(tile // e_pad, max_block_t, max(2, next_pow2(num_tokens))))
    blocks = _cdiv(num_tokens, block_t)
    programs = min(blocks, _program_cap(device))
    shared = capacity and programs > 1
    scratch = _scratch(device, e_pad) if shared else sums  # unused pointer when not shared

    if valid is not None:
        weights, plan = _W_VALID, None
    else:
        plan = _mask_plan(mask, num_tokens, positions, grid)
        weights = _W_NONE if plan is None else _W_MASK
    seq, col0, width = plan if plan is not None else (1, 0, 0)
    use_pos = weights == _W_MASK and positions is not None

    pr, (s_pt, s_pe) = _pointer(probs, 2, sums)
    ix, (s_it, s_ik) = _pointer(indices, 2, sums)
    dr, (s_dt, s_dk) = _pointer(dropped, 2, sums)
    va, (s_v,) = _pointer(valid, 1, sums)
    ma, (s_mb, s_ml) = _pointer(mask if weights == _W_MASK else None, 2, sums)
    po, (s_pos,) = _pointer(positions if use_pos else None, 1, sums)
    s_x0, s_xi, s_xj = cosel.stride() if cosel is not None else (0, 0, 0)
    s_r0, s_r = ranks.stride() if ranks is not None else (0, 0)
    s_s0, s_sc = sums.stride()
    s_c0, s_ck, s_ce = counts.stride()
    elems = block_t * e_pad
    _kernel[(programs,)](
        logits, pr, ix, dr, va, ma, po,
        sums, counts, absmax.view(torch.int64), scratch, cosel if cosel is not None else counts,
        ranks if ranks is not None else counts,
        num_tokens, num_experts, _cdiv(blocks, programs),
        *logits.stride(), s_pt, s_pe, s_it, s_ik, s_dt, s_dk, s_v, s_mb, s_ml, s_pos,
        row * s_s0, s_sc, row * s_c0, s_ck, s_ce, row * absmax.stride(0),
        seq, col0, width,
        row * s_x0, s_xi, s_xj, row * s_r0, s_r,
        SCORING=SIGMOID if scoring_code(scoring) == SIGMOID else SOFTMAX, HAS_PROBS=probs is not None,
        HAS_INDICES=indices is not None, HAS_DROPPED=dropped is not None, WEIGHTS=weights,
        HAS_POSITIONS=use_pos, K_SLOTS=k_slots, TOP_K=int(top_k) if capacity else 0, CAPACITY=capacity,
        SHARED_DROPS=shared, CF=capacity_factor if capacity else 0.0, COSEL=cosel is not None,
        RANKS=ranks is not None, BLOCK_T=block_t, E_PAD=e_pad,
        num_warps=max(1, min(4, elems // 256)),
    )
