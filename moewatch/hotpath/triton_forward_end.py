"""The forward end on CUDA: one Triton kernel launch per root forward.

What ``DeviceBank.end_with_torch`` does in about twenty small torch ops (each a kernel launch,
a few microseconds of a decode step each, eager or replayed in a CUDA graph), done in one
single-program launch:

1. add the forward's token rows (``Window.rows``), computed on the host at ``begin`` from shapes:
   rows[0] += B L; rows[1] += run_coef * run + add_sq; run = run + L (a decode step that
   continues the previous forward's rows) or L (new rows);
2. decide the cut on the device: grown = max over gates of (tokens - tokens at the last cut);
   cut when grown >= window_tokens, or when the reader asked (force) and anything was routed;
3. only when it cuts (rare: once a window): copy sums, counts, absmax and rows into ring slot
   ``cut_ptr % SLOTS``, note the tokens at this cut, zero absmax, the row run and the requests'
   runs, clear the request to cut, and advance ``cut_ptr``.

The same float64 arithmetic as the torch ops, in the same order (token rows are integers, exact).
Nothing is read back to the host, so the launch is captured in a CUDA graph and replays with it.
Tested on the CPU under ``TRITON_INTERPRET=1`` against the torch ops (tests/test_triton_forward_end.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import TOKENS
from .triton_backend import next_pow2

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except Exception:  # absent or broken: the torch ops run instead
    triton = tl = None
    AVAILABLE = False

BLOCK = 1024  # elements per copy step of the single program

if AVAILABLE:
    TOKENS_COL = tl.constexpr(TOKENS)

    # The rows arrive as integers (B L, B L^2, 2 B L and L are whole numbers): a Python float
    # argument would reach the kernel as float32 and round.
    @triton.jit(do_not_specialize=["num_gates", "sums_n", "counts_n", "runs_n", "add_tokens", "add_sq",
                                   "run_coef", "run_len"])
    def _forward_end_kernel(
            sums_ptr, counts_ptr, absmax_ptr, rows_ptr, row_run_ptr, runs_ptr,  # live state
            base_ptr, window_ptr, force_ptr, cut_ptr_ptr,  # the cut's bookkeeping
            cut_sums_ptr, cut_counts_ptr, cut_absmax_ptr, cut_rows_ptr,  # the ring [SLOTS, ...]
            num_gates, sums_n, counts_n, runs_n,  # G; elements of sums [G, C], counts [G, 3, E], runs [R]
            add_tokens, add_sq, run_coef, run_len,  # integers: this forward's rows (step 1)
            sums_cols: tl.constexpr, SLOTS: tl.constexpr, HAS_ROWS: tl.constexpr, CONTINUED: tl.constexpr,
            G_PAD: tl.constexpr, BLOCK: tl.constexpr):
        # 1. the forward's token rows. The new values stay in registers for the cut's copy: a
        # value stored by one thread is not read back by another without a barrier.
        rows_0 = tl.load(rows_ptr)  # [] float64 sum of t
        rows_1 = tl.load(rows_ptr + 1)  # [] float64 sum of t**2
        if HAS_ROWS:
            run = tl.load(row_run_ptr)  # [] float64 tokens per row so far in this window
            rows_0 = rows_0 + add_tokens.to(tl.float64)
            if CONTINUED:
                rows_1 = (rows_1 + run * run_coef.to(tl.float64)) + add_sq.to(tl.float64)
                tl.store(row_run_ptr, run + run_len.to(tl.float64))
            else:
                rows_1 = rows_1 + add_sq.to(tl.float64)
                tl.store(row_run_ptr, run_len.to(tl.float64))
            tl.store(rows_ptr, rows_0)
            tl.store(rows_ptr + 1, rows_1)
        # 2. the decision
        g = tl.arange(0, G_PAD)  # [G_PAD]
        on = g < num_gates
        tokens = tl.load(sums_ptr + g * sums_cols + TOKENS_COL, mask=on, other=0.0)  # [G_PAD] float64
        base = tl.load(base_ptr + g, mask=on, other=0.0)  # [G_PAD]
        grown = tl.max(tl.where(on, tokens - base, float("-inf")), axis=0)  # []
        cut = (grown >= tl.load(window_ptr)) | ((tl.load(force_ptr) > 0) & (grown > 0))  # []
        # 3. the cut
        if cut:
            slot = tl.load(cut_ptr_ptr) % SLOTS  # [] int64
            for start in range(0, sums_n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                tl.store(cut_sums_ptr + slot * sums_n + i, tl.load(sums_ptr + i, mask=i < sums_n), mask=i < sums_n)
            for start in range(0, counts_n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                tl.store(cut_counts_ptr + slot * counts_n + i, tl.load(counts_ptr + i, mask=i < counts_n),
                         mask=i < counts_n)
            tl.store(cut_absmax_ptr + slot * num_gates + g, tl.load(absmax_ptr + g, mask=on), mask=on)
            tl.store(cut_rows_ptr + slot * 2, rows_0)
            tl.store(cut_rows_ptr + slot * 2 + 1, rows_1)
            tl.store(base_ptr + g, tokens, mask=on)
            tl.store(absmax_ptr + g, tl.zeros([G_PAD], dtype=tl.float64), mask=on)
            tl.store(row_run_ptr, 0.0)
            for start in range(0, runs_n, BLOCK):
                i = start + tl.arange(0, BLOCK)
                tl.store(runs_ptr + i, tl.zeros([BLOCK], dtype=tl.float64), mask=i < runs_n)
            tl.store(force_ptr, 0)
            tl.store(cut_ptr_ptr, tl.load(cut_ptr_ptr) + 1)

# this forward's rows, from begin: (add_tokens, add_sq, run_coef, run_len, continued), integers
PendingRows = Tuple[int, int, int, int, bool]


def forward_end(bank, pending: Optional[PendingRows]) -> None:
    """One launch: the forward end of ``bank`` (a ``DeviceBank``, whose accumulators are
    contiguous: checked when it chose this kernel) with its rows ``pending``."""
    num_gates = bank.sums.shape[0]
    add_tokens, add_sq, run_coef, run_len, continued = pending if pending is not None else (0, 0, 0, 0, False)
    runs = bank._request_runs.runs
    _forward_end_kernel[(1,)](
        bank.sums, bank.counts, bank.absmax, bank.rows, bank._row_run, runs,
        bank.base_tokens, bank.window_tokens, bank.force, bank.cut_ptr,
        bank.cut_sums, bank.cut_counts, bank.cut_absmax, bank.cut_rows,
        num_gates, bank.sums.numel(), bank.counts.numel(), runs.numel(),
        int(add_tokens), int(add_sq), int(run_coef), int(run_len),
        sums_cols=bank.sums.shape[1], SLOTS=bank.cut_sums.shape[0], HAS_ROWS=pending is not None,
        CONTINUED=bool(continued), G_PAD=max(2, next_pow2(num_gates)), BLOCK=BLOCK,
        num_warps=4,
    )
