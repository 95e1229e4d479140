"""The forward hook that runs on every gate call.

It only observes: it returns None (the gate's output is untouched), runs under no_grad,
never syncs with the host, and swallows and counts its own failures.
"""
from __future__ import annotations

from typing import Optional

import torch

from .accumulators import AccumulatorBank
from .adapters.base import GateSpec
from .context import MaskTracker
from .errors import ErrorLog
from .stats import TOKENS, gate_sums, would_be_drops


class GateHook:
    def __init__(self, spec: GateSpec, bank: AccumulatorBank, row: int, masks: MaskTracker,
                 errors: ErrorLog, capacity_factor: Optional[float]):
        self.extract = spec.extract
        self.mask_key = spec.mask_key
        self.name = spec.info.name
        self.scoring = spec.info.scoring
        self.top_k = spec.info.top_k
        self.native_capacity = spec.info.native_capacity
        self.bank = bank
        self.row = row
        self.masks = masks
        self.errors = errors
        self.capacity_factor = capacity_factor
        self.sampler = None  # a moewatch.decisions.DecisionSampler with sample_decisions > 0

    def __call__(self, module, args, kwargs, output):
        try:
            with torch.no_grad():
                self._observe(module, args, kwargs, output)
        except Exception as error:  # never raise into the model's forward
            self.errors.record("hook", error, where=self.name)
        return None

    def _observe(self, module, args, kwargs, output) -> None:
        routing = self.extract(module, args, kwargs, output)
        logits = routing.logits  # [T, E]
        valid = routing.valid
        if valid is None and routing.positions is None:
            valid = self.masks.valid(self.mask_key, logits.shape[0])  # [T] or None
        elif valid is None:  # a gathered subset of the call's tokens: read the mask at their places
            grid = self.masks.valid(self.mask_key, routing.grid)  # [B*S] or None
            valid = None if grid is None else grid.index_select(0, routing.positions)  # [T]
        scalars, prob_sum, counts, drops, absmax = gate_sums(
            logits, routing.indices, valid, self.scoring, self.top_k, routing.probs, routing.dropped)
        if drops is None and self.capacity_factor and not self.native_capacity:
            drops = would_be_drops(counts, scalars[TOKENS], self.top_k, self.capacity_factor)
        if scalars.device != self.bank.device:  # a gate placed on another device than at attach
            move = lambda t: None if t is None else t.to(self.bank.device, non_blocking=True)  # noqa: E731
            scalars, prob_sum, counts, drops, absmax = map(move, (scalars, prob_sum, counts, drops, absmax))
        self.bank.add(self.row, scalars, prob_sum, counts, drops, absmax)
        if self.sampler is not None:  # sampled decisions for dumps: device ops only, like the sums
            self.sampler.record(logits, routing.indices, routing.probs, valid, routing.positions)


class CompanionHook:
    """An adapter's helper hook (see ``adapters.base.Companion``), guarded like the gate hook."""

    def __init__(self, hook, gate: GateHook):
        self.hook = hook
        self.gate = gate

    def __call__(self, *args):
        try:
            with torch.no_grad():
                self.hook(*args)
        except Exception as error:  # never raise into the model's forward
            self.gate.errors.record("hook", error, where=self.gate.name)
        return None
