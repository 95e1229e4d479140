"""Cumulative per-gate accumulators on the gates' device.

The hooks only ever add into these tensors in place; they are never reset. A window is the
difference of two snapshots, so counting stays correct under CUDA-graph replay (captured
in-place adds replay, Python does not) and no reader ever races a reset.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .stats import NUM_SCALARS


@dataclass
class Snapshot:
    """Host copy of every accumulator at one instant (all numpy)."""

    time: float
    sums: np.ndarray  # float64 [G, NUM_SCALARS + E_max]: scalar sums, then router-prob sums
    counts: np.ndarray  # int64 [G, 2, E_max]: assignments, dropped assignments
    absmax: np.ndarray  # float64 [G]: max |logit| since the previous snapshot (the closed epoch)


class AccumulatorBank:
    """Fixed-size accumulators for the gates that live on one device."""

    def __init__(self, num_gates: int, max_experts: int, device: torch.device):
        self.device = torch.device(device)
        self.max_experts = max_experts
        self.sums = torch.zeros(num_gates, NUM_SCALARS + max_experts, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_gates, 2, max_experts, dtype=torch.int64, device=device)
        # max |logit| has no difference of snapshots: it is kept per epoch in two slots; the
        # reader flips the epoch when it closes a window and reads the slot just closed.
        self.absmax = torch.zeros(num_gates, 2, dtype=torch.float64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self._epoch_host = 0
        # Forwards may run on several threads; in-place adds are read-modify-write.
        self.lock = threading.Lock()

    def add(self, row: int, scalars, prob_sum, counts, drops: Optional[torch.Tensor], absmax) -> None:
        """Add one call's sums (from :func:`moewatch.stats.gate_sums`) into gate ``row``."""
        num_experts = prob_sum.shape[0]
        # float -> int64 is exact: the float sums of 0/1 weights are whole numbers.
        count_rows = counts.round().to(torch.int64)
        with self.lock:
            self.sums[row, :NUM_SCALARS].add_(scalars)
            self.sums[row, NUM_SCALARS:NUM_SCALARS + num_experts].add_(prob_sum)
            self.counts[row, 0, :num_experts].add_(count_rows)
            if drops is not None:
                self.counts[row, 1, :num_experts].add_(drops.round().to(torch.int64))
            self.absmax[row].scatter_reduce_(0, self.epoch, absmax.to(torch.float64).reshape(1), reduce="amax")

    def snapshot(self, close_epoch: bool) -> tuple:
        """Copy the accumulators to the host. With ``close_epoch``, also start a new max epoch.

        On CUDA the copies run on a side stream and only the calling (reader) thread waits.
        """
        if self.device.type == "cuda":
            return self._snapshot_cuda(close_epoch)
        with self.lock:
            sums = self.sums.numpy().copy()
            counts = self.counts.numpy().copy()
            absmax = self._take_absmax(close_epoch)
        return sums, counts, absmax

    def _take_absmax(self, close_epoch: bool):
        current = self._epoch_host
        value = self.absmax[:, current].clone()
        if close_epoch:
            nxt = 1 - current
            self.absmax[:, nxt].zero_()
            self.epoch.fill_(nxt)
            self._epoch_host = nxt
        return value

    def _snapshot_cuda(self, close_epoch: bool):
        stream = torch.cuda.Stream(device=self.device)
        with self.lock:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                sums = self.sums.to("cpu", non_blocking=True)
                counts = self.counts.to("cpu", non_blocking=True)
                absmax = self._take_absmax(close_epoch).to("cpu", non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
        done.synchronize()
        return sums.numpy(), counts.numpy(), absmax.numpy()
