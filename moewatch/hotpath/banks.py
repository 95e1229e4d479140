"""The banks of one monitor: one per device its gates live on, and the windows cut from them.

Gates on the CPU go to a :class:`~moewatch.hotpath.staged.StagedBank`, gates on any other
device to a :class:`~moewatch.hotpath.device.DeviceBank`. Each bank cuts windows at forward
ends; with several banks (a model split across devices) the k-th cuts of every bank make the
k-th window, which is exact when every device's gates see the same tokens.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ops
from .device import DeviceBank
from .layout import SCORING_CODES, symmetric
from .staged import NO_MASKS, GateParams, StagedBank
from ..context import skip_top_level_frames

BACKENDS = ("auto", "staged", "device")


class _ThreadMasks(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.masks: Mapping[str, torch.Tensor] = NO_MASKS


class Banks:
    """Per-device banks of one monitor, registered with the ops for as long as it is attached."""

    def __init__(self, gates: Sequence, devices: Sequence[torch.device], capacity_factors: Sequence[float],
                 mask_keys: Sequence[str], errors, window_tokens: int, sampler_of: Callable[[str], object],
                 backend: str = "auto"):
        self.errors = errors
        self.window_tokens = window_tokens
        by_device: Dict[torch.device, List[int]] = {}
        for index, device in enumerate(devices):
            by_device.setdefault(torch.device(device), []).append(index)
        self.banks = []
        self.ticks = torch.zeros(1, dtype=torch.int64)  # the begin/end ops' declared mutation
        self.rows: List[Tuple[int, int]] = [None] * len(gates)  # gate index -> (bank index, row)
        self.members: List[List[int]] = []  # bank index -> gate indices in row order
        for device, members in by_device.items():
            params = [GateParams(gates[i].name, gates[i].num_experts, gates[i].top_k,
                                 SCORING_CODES[gates[i].scoring], float(capacity_factors[i] or 0.0), mask_keys[i])
                      for i in members]
            samplers = [sampler_of(gates[i].name) for i in members]
            staged = backend == "staged" or (backend == "auto" and device.type == "cpu")
            if staged and device.type != "cpu":
                raise ValueError("the staged backend runs on CPU gates only")
            # the stage op reads the ticks: traced with begin/end, it stays between them
            bank = (StagedBank(params, errors, samplers.__getitem__, token=self.ticks) if staged else
                    DeviceBank(params, device, errors, window_tokens, samplers.__getitem__, self.mask))
            bank.bank_id = ops.register(bank)
            for row, gate_index in enumerate(members):
                self.rows[gate_index] = (len(self.banks), row)
            self.banks.append(bank)
            self.members.append(members)
        self._thread = _ThreadMasks()
        self.bank_id = ops.register(self)
        self._pending: List[deque] = [deque() for _ in self.banks]
        self.num_gates = len(gates)

    # -- forward boundaries (the root module's hooks, directly or through the ops) -------------
    def begin(self, mask=None, decoder_mask=None, rows=None) -> None:
        """A root forward begins on this thread; ``mask`` [B, L]: its padding mask, or None;
        ``rows``: (B, L, continued), its token rows (one per request; ``continued``: those of
        this thread's previous forward, one decode step on); or the requests its engine named
        (``moewatch.hotpath.requests.RequestTokens``); or None where neither is known."""
        # runs at every root forward: a decode step of a small model is a millisecond
        state = self._thread
        depth = state.depth = state.depth + 1
        if depth == 1:
            state.masks = NO_MASKS if mask is None and decoder_mask is None else \
                {"attention_mask": mask, "decoder_attention_mask": decoder_mask}
        else:
            rows = None  # a nested forward's tokens are the outer one's
        masks = state.masks
        for bank in self.banks:
            bank.begin(masks, rows)

    def end(self, ticks=None) -> None:
        state = self._thread
        if state.depth <= 1:
            state.depth, state.masks = 0, NO_MASKS
        else:
            state.depth -= 1
        for bank in self.banks:
            bank.end()

    # -- forward boundaries marked by an engine's steps (Engine.drive_steps) --------------------
    def steppable(self) -> bool:
        """Whether an engine's steps may mark the forwards: every bank is a host bank, whose
        gate calls read no mask from this thread's state (a device bank's do)."""
        return all(isinstance(bank, StagedBank) for bank in self.banks)

    def begin_step(self, requests=None) -> None:
        """An engine's step begins a forward without padding on this thread; ``requests``: the
        ``RequestTokens`` of the step, or None."""
        for bank in self.banks:
            bank.begin(NO_MASKS, requests)

    def end_step(self) -> None:
        """The step's forward has ended (``begin_step``)."""
        for bank in self.banks:
            bank.end()

    def mask(self, key: str):
        """The padding mask of the root forward running on this thread (None: none)."""
        return self._thread.masks.get(key)

    # -- the reader -----------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        """Whether a reader's poll at ``now`` has anything to take."""
        return any(bank.due(now) for bank in self.banks)

    def next_look(self) -> float:
        """When (time.time()) the next poll has something to take, unless a bank wakes the
        reader sooner (see ``set_wake``); 0.0: at the reader's own pace (a device bank)."""
        return min(bank.next_look() for bank in self.banks)

    def set_wake(self, wake: Optional[Callable[[], None]]) -> None:
        """``wake()`` is called on a forward's thread when a poll is due sooner than ``next_look``."""
        for bank in self.banks:
            if hasattr(bank, "on_due"):
                bank.on_due = wake

    def take(self, force: bool, on_window: Callable, idle: bool = True, hold: bool = False) -> None:
        """Reduce what the forwards left and call ``on_window(t, sums, counts, absmax, rows)`` per cut.

        Arrays are in gate order: sums float64 [G, C], counts int64 [G, 2, E], absmax [G]; and
        rows float64 [2], the root forwards' token rows since attach (``Window.rows``).
        ``hold``: a host bank may leave forwards that no cut needs for a later take.
        """
        now = time.time()
        for index, bank in enumerate(self.banks):
            pending = self._pending[index]
            bank.take(self.window_tokens, force, lambda *cut, q=pending: q.append(cut), now, idle, hold)
        if force and len(self.banks) > 1 and any(self._pending):
            # a bank without traffic since its last cut contributes its state as it stands
            for index, bank in enumerate(self.banks):
                if not self._pending[index]:
                    sums, counts = bank.live()
                    self._pending[index].append((now, sums, counts, np.zeros(sums.shape[0]), bank.rows_total()))
        while all(self._pending):
            cuts = [q.popleft() for q in self._pending]
            on_window(max(c[0] for c in cuts), *self._gather(cuts))

    def _gather(self, cuts) -> tuple:
        if len(cuts) == 1:
            return cuts[0][1:]
        width = max(c[1].shape[1] for c in cuts)
        experts = max(c[2].shape[2] for c in cuts)
        sums = np.zeros((self.num_gates, width))
        counts = np.zeros((self.num_gates, cuts[0][2].shape[1], experts), dtype=np.int64)
        absmax = np.zeros(self.num_gates)
        for (_, s, c, a, _), members in zip(cuts, self.members):
            sums[members, :s.shape[1]] = s
            counts[members, :, :c.shape[2]] = c
            absmax[members] = a
        return sums, counts, absmax, cuts[0][4]  # every bank sees every root forward's rows

    def live(self) -> Tuple[np.ndarray, np.ndarray]:
        """sums [G, C] and counts [G, 2, E] since attach, in gate order (host copies)."""
        parts = [bank.live() for bank in self.banks]
        if len(parts) == 1:
            return parts[0]
        width = max(p[0].shape[1] for p in parts)
        experts = max(p[1].shape[2] for p in parts)
        sums = np.zeros((self.num_gates, width))
        counts = np.zeros((self.num_gates, parts[0][1].shape[1], experts), dtype=np.int64)
        for (s, c), members in zip(parts, self.members):
            sums[members, :s.shape[1]] = s
            counts[members, :, :c.shape[2]] = c
        return sums, counts

    def coselection(self) -> np.ndarray:
        """int64 [G, E_max, E_max] co-selection counts since attach, in gate order, symmetric
        (see ``layout``): every forward reduced (CPU) or run (devices) so far."""
        parts = [bank.coselection() for bank in self.banks]
        experts = max(p.shape[1] for p in parts)
        out = np.zeros((self.num_gates, experts, experts), dtype=np.int64)
        for part, members in zip(parts, self.members):
            out[members, :part.shape[1], :part.shape[2]] = part
        return symmetric(out)

    def set_ranks(self, gate_index: int, ranks) -> None:
        """Place the experts of gate ``gate_index``: int64 [E] rank of each expert, or None."""
        bank, row = self.rows[gate_index]
        self.banks[bank].set_ranks(row, ranks)

    def set_locate_rows(self, locate) -> None:
        """Where an engine gathers data-parallel ranks' tokens before routing: ``locate(rows of
        this rank, rows gathered)`` gives the first of this rank's rows (``gathered``)."""
        for bank in self.banks:
            bank.locate_rows = locate

    def close(self) -> None:
        for bank in self.banks:
            ops.unregister(bank.bank_id)
        ops.unregister(self.bank_id)


skip_top_level_frames(Banks.begin, Banks.end, StagedBank.begin, StagedBank.end, DeviceBank.begin, DeviceBank.end)
