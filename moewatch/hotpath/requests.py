"""The requests an engine names behind a forward, counted into ``Window.rows``.

A serving engine runs many requests in one flat batch, so its forwards' shapes say nothing of
them; but its scheduler says which request each token belongs to (vLLM's ``SchedulerOutput.
num_scheduled_tokens``: request id -> tokens this step). Tokens of one request route alike, so
the detector weighs a window's evidence by its requests (``moewatch.detector.pooling``):
``Window.rows`` sums, over the window's requests, their tokens in the window (t) and t**2.

A request that goes on over several forwards (chunked prefill, then one token per decode step)
is one request: its tokens so far in the window are kept by its key, its square grows by
(n + l)**2 - n**2, and a window cut starts every request at 0 again. Each bank keeps these runs
its own way: the staged bank on the host, in its reader (:class:`HostRequestRuns`); the device
bank on the device, where its cuts are decided (:class:`DeviceRequestRuns`).
"""
from __future__ import annotations

import threading
from typing import Dict, Hashable, List, Sequence, Tuple

import numpy as np
import torch

# Requests a device bank keeps a run for at once. Past that (more requests in flight than this,
# none of them finished), every run starts again at 0 (``restarts``): a request's tokens before
# and after count as two requests, in a window that already holds thousands.
DEVICE_SLOTS = 4096


class RequestTokens:
    """The requests behind one forward: request ``keys[i]`` has ``tokens[i]`` of its tokens in
    it; ``finished``: keys of requests the engine has ended since (their runs can be dropped)."""

    __slots__ = ("keys", "tokens", "finished")

    def __init__(self, keys: Sequence[Hashable], tokens: Sequence[int], finished: Sequence[Hashable] = ()):
        if len(keys) != len(tokens):
            raise ValueError(f"{len(keys)} request keys for {len(tokens)} token counts")
        keys, tokens = tuple(keys), tuple(int(t) for t in tokens)
        if len(set(keys)) != len(keys):  # one request named twice: its tokens together
            merged: Dict[Hashable, int] = {}
            for key, count in zip(keys, tokens):
                merged[key] = merged.get(key, 0) + count
            keys, tokens = tuple(merged), tuple(merged.values())
        self.keys: Tuple[Hashable, ...] = keys
        self.tokens: Tuple[int, ...] = tokens
        self.finished: Tuple[Hashable, ...] = tuple(finished)

    @classmethod
    def of_step(cls, scheduled: Dict[Hashable, int], finished: Sequence[Hashable] = ()) -> "RequestTokens":
        """An engine step's requests from its scheduler's ``{request key: tokens}`` (a dict: its
        keys are distinct) and ints; built on the forward's thread, so without the checks of
        the constructor."""
        step = cls.__new__(cls)
        step.keys, step.tokens, step.finished = tuple(scheduled), tuple(scheduled.values()), tuple(finished)
        return step

    def __repr__(self) -> str:
        return f"RequestTokens({dict(zip(self.keys, self.tokens))}, finished={list(self.finished)})"


class HostRequestRuns:
    """Tokens so far in the window, by request key (the staged bank's reader, in forward order)."""

    def __init__(self) -> None:
        self._runs: Dict[Hashable, float] = {}

    def add(self, requests: RequestTokens) -> Tuple[float, float]:
        """One forward's requests: what it adds to (sum of t, sum of t**2). Plain floats: the
        reader runs this for every forward (an array and its ``tolist`` cost it ~2 us each)."""
        for key in requests.finished:
            self._runs.pop(key, None)
        tokens = squares = 0.0
        runs = self._runs
        for key, length in zip(requests.keys, requests.tokens):
            before = runs.get(key, 0.0)
            after = before + length
            runs[key] = after
            tokens += length
            squares += after * after - before * before
        return tokens, squares

    def cut(self) -> None:
        """A window was cut: every request counts its tokens from 0 in the next one."""
        self._runs.clear()


class DeviceRequestRuns:
    """Tokens so far in the window, by request, on the device (no host sync).

    The host gives each request key a slot (kept until the engine says it finished); the device
    keeps a run per slot, ``runs`` [S], zeroed where a window is cut (:meth:`cut`, inside the
    bank's forward-end ops) and where a slot is handed to a new request."""

    def __init__(self, device: torch.device, rows: torch.Tensor, slots: int = DEVICE_SLOTS):
        self._rows = rows  # [2] float64: the bank's (sum of t, sum of t**2) since attach
        self.runs = torch.zeros(slots, dtype=torch.float64, device=device)  # [S]
        self._slot_of: Dict[Hashable, int] = {}  # host
        self._free: List[int] = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()  # forwards on several threads share the slots
        self.restarts = 0  # times the slots ran out and every run started again

    def _restart(self) -> None:
        self.restarts += 1
        self._slot_of.clear()
        self._free = list(range(self.runs.shape[0] - 1, -1, -1))
        self.runs.zero_()

    def add(self, requests: RequestTokens) -> None:
        """One forward's requests, added on the device: a few small ops, host-to-device copies
        that do not wait for the device."""
        with self._lock:
            self._add(requests)

    def _add(self, requests: RequestTokens) -> None:
        for key in requests.finished:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._free.append(slot)
        if not requests.keys:
            return
        device = self.runs.device
        if len(requests.keys) > self.runs.shape[0]:  # more than fit at once: each starts anew
            self._restart()
            length = torch.tensor(requests.tokens, dtype=torch.float64).to(device, non_blocking=True)  # [R]
            self._rows[0].add_(length.sum())
            self._rows[1].add_((length * length).sum())
            return
        slot_of, free = self._slot_of, self._free
        if sum(key not in slot_of for key in requests.keys) > len(free):
            self._restart()  # more live requests than slots: every run starts again
            slot_of, free = self._slot_of, self._free
        fresh: List[int] = []
        slots: List[int] = []
        for key in requests.keys:
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = free.pop()
                fresh.append(slot)
            slots.append(slot)
        if fresh:  # a slot handed to a new request may hold its last owner's run
            self.runs.index_fill_(0, torch.tensor(fresh, dtype=torch.int64).to(device, non_blocking=True), 0.0)
        index = torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True)  # [R]
        length = torch.tensor(requests.tokens, dtype=torch.float64).to(device, non_blocking=True)  # [R]
        before = self.runs.index_select(0, index)  # [R]
        self._rows[0].add_(length.sum())
        self._rows[1].add_(((2.0 * before + length) * length).sum())  # (n + l)**2 - n**2
        self.runs.index_add_(0, index, length)

    def cut(self, cut: torch.Tensor) -> None:
        """``cut`` [] bool (device): a window was cut at this forward end."""
        self.runs.masked_fill_(cut, 0.0)
