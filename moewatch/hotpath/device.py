"""The device backend (CUDA, and any device without the CPU backend): statistics added on the device.

Each gate call is one ``moewatch::observe`` op that computes every statistic and adds it into
cumulative device accumulators: one Triton kernel on CUDA (``triton_backend``), the torch
reference elsewhere or where Triton is absent. Nothing reads a value back to the host, so a
forward can be captured in a CUDA graph and replayed: the adds replay with it.

Windows are cut on the device too, at forward ends (``end``): when the window holds
``window_tokens`` tokens, or the reader asked for a cut (``window_seconds``), a copy of the
cumulative accumulators goes into a small device ring of cuts. The reader copies new cuts to
the host on a side stream. So a window never splits a forward, graph replays included, and
the same traffic cuts the same windows.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Optional, Sequence

import torch

from .gathered import Locate, own_decisions
from .layout import COUNT_ROWS, FUSED_MAX_EXPERTS, NUM_SCALARS, TOKENS
from .reference import accumulate, gate_sums, mask_weights
from .requests import DeviceRequestRuns, RequestTokens
from .staged import started_before_attach

CUT_SLOTS = 64  # cuts the reader may fall behind by before one is lost (counted)


def _cuda_entry(device: torch.device, module: str, name: str):
    """``moewatch.hotpath.<module>.<name>`` on CUDA when Triton is installed; else None."""
    if device.type != "cuda":
        return None
    try:
        backend = importlib.import_module(f"{__package__}.{module}")
    except Exception:  # Triton missing or broken: the torch ops still count exactly
        return None
    return getattr(backend, name) if backend.AVAILABLE else None


def fused_kernel_for(device: torch.device):
    """The Triton kernel's entry point on CUDA when Triton is installed; else None (the reference).

    The entry that skips the accumulator checks: the bank made its accumulators to fit its gates."""
    return _cuda_entry(device, "triton_backend", "launch")


def forward_end_kernel_for(device: torch.device):
    """The forward end's single Triton launch on CUDA when Triton is installed; else None (torch ops)."""
    return _cuda_entry(device, "triton_forward_end", "forward_end")


def _static_shapes(*tensors: torch.Tensor) -> None:
    """The accumulators never change shape: under ``torch.compile(dynamic=True)`` their sizes
    are constants, not symbols that a batch of the same size would tie to them (and recompile)."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static", None)
    if mark is not None:
        for tensor in tensors:
            mark(tensor)


class _ForwardThread(threading.local):
    """A thread's forwards on a device bank."""

    def __init__(self) -> None:
        self.rows = None  # the token rows of its root forward, added at its end (see begin)
        self.depth = 0  # its root forwards under way (a nested one: an encoder inside the model)
        self.settled = False  # no root forward of it began before attach (staged.started_before_attach)


class DeviceBank:
    """Device accumulators of the gates on one device (see the module docstring)."""

    def __init__(self, gates: Sequence, device: torch.device, errors, window_tokens: int,
                 sampler_of: Callable[[int], object] = None, mask_of: Callable[[str], object] = lambda key: None):
        self.mask_of = mask_of  # the padding mask of this thread's root forward, by key
        self.gates = list(gates)
        self.device = torch.device(device)
        self.errors = errors
        self.sampler_of = sampler_of or (lambda row: None)
        self.locate_rows: Optional[Locate] = None  # see gathered (an engine's data-parallel rows)
        num_gates, max_experts = len(self.gates), max(g.num_experts for g in self.gates)
        f64 = dict(dtype=torch.float64, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(num_gates, NUM_SCALARS + max_experts, **f64)  # [G, C]
        self.counts = torch.zeros(num_gates, COUNT_ROWS, max_experts, **i64)  # [G, 3, E]
        self.absmax = torch.zeros(num_gates, **f64)  # [G] since the last cut
        # [2] the requests' tokens and tokens squared, summed since attach (Window.rows)
        self.rows = torch.zeros(2, **f64)
        self._row_tokens, self._row_tokens_sq = self.rows[0], self.rows[1]  # views, made once
        # [] tokens per row so far in this window of the rows that decode steps continue (reset
        # at each cut: a request that goes on counts its tokens in the next window anew), and
        # (host) how many rows that is; shared by the threads that run forwards on this device
        self._row_run = torch.zeros((), **f64)
        self._row_batch: Optional[int] = None
        self._request_runs = DeviceRequestRuns(self.device, self.rows)  # where an engine names requests
        # co-selection (upper triangle, see layout): read live by the reader, never cut per window
        self.cosel = torch.zeros(num_gates, max_experts, max_experts, **i64)  # [G, E, E]
        self.ranks = torch.full((num_gates, max_experts), -1, **i64)  # [G, E] rank of each expert, -1: none
        self._placed = [False] * num_gates  # host: which rows have a placement
        # the ring of cuts: cumulative copies taken at forward ends
        self.cut_sums = torch.zeros(CUT_SLOTS, num_gates, NUM_SCALARS + max_experts, **f64)  # [S, G, C]
        self.cut_counts = torch.zeros(CUT_SLOTS, num_gates, COUNT_ROWS, max_experts, **i64)  # [S, G, 3, E]
        self.cut_absmax = torch.zeros(CUT_SLOTS, num_gates, **f64)  # [S, G]
        self.cut_rows = torch.zeros(CUT_SLOTS, 2, **f64)  # [S, 2]
        self.cut_ptr = torch.zeros(1, **i64)  # [1] cuts made since attach
        self.base_tokens = torch.zeros(num_gates, **f64)  # [G] tokens at the last cut
        self.force = torch.zeros(1, **i64)  # [1] 1: the reader asks for a cut at the next forward end
        self.window_tokens = torch.full((1,), float(window_tokens), **f64)  # [1]
        _static_shapes(self.sums, self.counts, self.absmax, self.cosel, self.ranks)
        self._seen = 0  # cuts the reader has taken (host)
        self._lock = threading.Lock()  # reader-side only
        self._fused = fused_kernel_for(self.device)
        self._fused_end = forward_end_kernel_for(self.device)
        if self._fused_end is not None:  # the kernel reads these as flat buffers: checked once, here
            for t in (self.sums, self.counts, self.cut_sums, self.cut_counts, self.cut_absmax, self.cut_rows,
                      self._request_runs.runs):
                assert t.is_contiguous(), "the forward-end kernel reads the accumulators as flat buffers"
        self._thread = _ForwardThread()
        # () -> whether a monitored root module is running on this thread (set by the monitor):
        # a gate called outside a monitored forward while one is belongs to a forward that began
        # before the monitor was attached, and is not counted (its earlier gates were not)
        self.root_running: Optional[Callable[[], bool]] = None
        if self._fused is not None:  # scratch of the would-be-drops phase, before any graph capture
            from . import triton_backend

            for gate in self.gates:
                if gate.capacity_factor > 0 and gate.num_experts <= FUSED_MAX_EXPERTS:
                    triton_backend.reserve(self.device, gate.num_experts)

    def set_ranks(self, row: int, ranks) -> None:
        """Place gate ``row``'s experts: int64 [E] rank of each expert (in [0, E)), or None.
        Call it at attach, before any forward (and before any graph capture)."""
        if ranks is None:
            self.ranks[row].fill_(-1)
            self._placed[row] = False
            return
        ranks = torch.as_tensor(ranks, dtype=torch.int64)
        self.ranks[row].fill_(-1)
        self.ranks[row, :ranks.shape[0]].copy_(ranks.to(self.device))
        self._placed[row] = True

    # -- the forward ----------------------------------------------------------------------------
    def begin(self, masks=None, rows=None) -> None:
        """A root forward begins (the masks are read through mask_of, at each call); ``rows``:
        its token rows (B, L, continued), its engine's ``RequestTokens``, or None. B rows of L
        new tokens, each row one request; a decode step (``continued``) grows the rows of the
        previous forward, their squares by B ((n + L)**2 - n**2). Host integers only here: the
        forward's ``end`` adds them on the device (``take_rows``); an engine's requests are
        added now, with a few small ops and no host sync."""
        state = self._thread
        state.depth, state.settled = state.depth + 1, True
        if rows is None:  # a nested forward's rows are the outer one's, pending till an end takes them
            return
        try:
            if isinstance(rows, RequestTokens):
                self._request_runs.add(rows)
                return
            batch, length, continued = int(rows[0]), int(rows[1]), rows[2]  # no generator: traceable by any Dynamo
            tokens = batch * length
            continued = bool(continued) and batch == self._row_batch
            # added at the forward's end (one launch on CUDA): B L, B L**2, then B * 2 n L where
            # the rows continue (n: their run so far), and the run grows by L or starts at L
            self._thread.rows = (tokens, tokens * length, 2 * tokens if continued else 0, length, continued)
            self._row_batch = batch
        except Exception as error:  # the forward goes on; its rows are not counted, and that is seen
            self.errors.record("hook", error, where="rows")

    def observe(self, row: int, logits, indices, probs, dropped, valid, positions, grid: int,
                sums, counts, absmax) -> None:
        """Add one gate call into ``sums``/``counts``/``absmax`` (device ops only)."""
        gate = self.gates[row]
        if not self._thread.depth and started_before_attach(self._thread, self.root_running):
            return
        if self.locate_rows is not None:  # an engine that may gather ranks' tokens: [T_all, k] -> [T, k]
            indices = own_decisions(logits, indices, self.locate_rows)
        mask = None if valid is not None else self.mask_of(gate.mask_key)  # [B, L] or None
        with torch.no_grad():  # the hook runs outside any grad context of its own
            self._observe(gate, row, logits, indices, probs, dropped, valid, mask, positions, grid,
                          sums, counts, absmax)

    def _observe(self, gate, row, logits, indices, probs, dropped, valid, mask, positions, grid,
                 sums, counts, absmax) -> None:
        placed = self._placed[row]
        if self._fused is not None and gate.num_experts <= FUSED_MAX_EXPERTS:  # wider gates: the reference
            self._fused(logits, indices, probs, dropped, valid, mask, positions, grid, sums, counts, absmax,
                        row, gate.top_k, gate.scoring, gate.capacity_factor, cosel=self.cosel,
                        ranks=self.ranks if placed else None)
        else:
            if valid is None:
                valid = mask_weights(mask, logits.shape[0], positions, grid)
            part = gate_sums(logits, indices, valid, gate.scoring, gate.top_k, probs, dropped,
                             gate.capacity_factor, ranks=self.ranks[row, :gate.num_experts] if placed else None,
                             coselect=True)
            accumulate(sums, counts, absmax, row, part, self.cosel)
        sampler = self.sampler_of(row)
        if sampler is not None:
            sampler.record(logits, indices, probs, valid if valid is not None else
                           mask_weights(mask, logits.shape[0], positions, grid), positions)

    def end(self, ticks=None) -> None:
        """At a root forward's end: add the forward's token rows, and cut a window into the ring
        if it is due (device ops only: one launch on CUDA, ``triton_forward_end``). A nested
        forward's end does nothing: a window never ends between its gates and the rest of its
        root forward's."""
        state = self._thread
        depth = state.depth
        state.depth, state.settled = max(depth - 1, 0), True
        if depth > 1:  # a nested forward (an encoder inside the model's call): the outer one ends it
            return
        pending = self.take_rows()
        if self._fused_end is not None:
            try:
                self._fused_end(self, pending)
                return
            except Exception as error:  # counted; from now on the torch ops do the same work
                self._fused_end = None
                self.errors.record("hook", error, where="forward end kernel")
        self.end_with_torch(pending)

    def take_rows(self):
        """This thread's pending token rows (``begin``'s, for its forward's end), or None; cleared."""
        pending, self._thread.rows = self._thread.rows, None
        return pending

    def end_with_torch(self, pending=None) -> None:
        """``end`` in torch ops: the readable form, and where the kernel does not run."""
        if pending is not None:
            try:
                self._add_rows(*pending)
            except Exception as error:  # the forward goes on; its rows are not counted, and that is seen
                self.errors.record("hook", error, where="rows")
        tokens = self.sums[:, TOKENS]  # [G]
        grown = (tokens - self.base_tokens).amax()  # []
        cut = (grown >= self.window_tokens[0]) | ((self.force[0] > 0) & (grown > 0))  # []
        slot = self.cut_ptr % CUT_SLOTS  # [1]
        for ring, live in ((self.cut_sums, self.sums), (self.cut_counts, self.counts),
                           (self.cut_absmax, self.absmax), (self.cut_rows, self.rows)):
            kept = ring.index_select(0, slot)  # [1, ...]
            ring.index_copy_(0, slot, torch.where(cut, live.unsqueeze(0), kept))
        self.base_tokens.copy_(torch.where(cut, tokens, self.base_tokens))
        self.absmax.masked_fill_(cut, 0.0)
        self._row_run.masked_fill_(cut, 0.0)
        self._request_runs.cut(cut)
        self.force.masked_fill_(cut, 0)
        self.cut_ptr.add_(cut.to(torch.int64))

    def _add_rows(self, add_tokens: int, add_sq: int, run_coef: int, run_len: int, continued: bool) -> None:
        self._row_tokens.add_(float(add_tokens))
        if continued:
            self._row_tokens_sq.add_(self._row_run, alpha=float(run_coef))  # B * 2 n L
            self._row_tokens_sq.add_(float(add_sq))  # B L**2
            self._row_run.add_(float(run_len))
        else:
            self._row_tokens_sq.add_(float(add_sq))
            self._row_run.fill_(float(run_len))

    # -- the reader -----------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """A poll always takes: the device cuts windows itself, the reader collects them."""
        return True

    def next_look(self) -> float:
        """Every poll takes (see ``due``): the reader polls at its own pace."""
        return 0.0

    def take(self, window_tokens: float, force: bool, on_cut: Callable, now: float,
             idle: bool, hold: bool = False) -> None:
        """Hand every new cut to ``on_cut``; with ``force``, ask for a cut (made now when idle)."""
        with self._lock:
            if force:
                self.force.fill_(1)
                if idle:  # no forward is running to cut at: cut here (the state is at a boundary)
                    self.end()
            ptr = int(self._host(self.cut_ptr)[0])
            if ptr - self._seen > CUT_SLOTS:
                self.errors.record("reader", RuntimeError(
                    f"{ptr - self._seen - CUT_SLOTS} window(s) were cut on the device faster than "
                    "they were read, and lost"))
                self._seen = ptr - CUT_SLOTS
            while self._seen < ptr:
                slot = self._seen % CUT_SLOTS
                self._seen += 1
                on_cut(now, self._host(self.cut_sums[slot]).numpy(), self._host(self.cut_counts[slot]).numpy(),
                       self._host(self.cut_absmax[slot]).numpy(), self._host(self.cut_rows[slot]).numpy())

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy, made on a side stream on CUDA so only the reader waits."""
        if self.device.type != "cuda":
            return tensor.to("cpu", copy=True)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = tensor.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        return out

    def rows_total(self):
        """float64 [2]: the token rows of the forwards so far (``Window.rows``), a host copy."""
        with self._lock:
            return self._host(self.rows).numpy()

    def live(self):
        """Host copies (numpy) of the live sums and counts (counts since attach)."""
        with self._lock:
            return self._host(self.sums).numpy(), self._host(self.counts).numpy()

    def coselection(self):
        """Host copy (numpy int64 [G, E_max, E_max], upper triangle) of the live co-selection counts:
        every call the device has run so far, read on a side stream (not cut at a forward end)."""
        with self._lock:
            return self._host(self.cosel).numpy()
