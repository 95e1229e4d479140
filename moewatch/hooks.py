"""The forward hook that runs on every gate call.

It only observes: it returns None (the gate's output is untouched), runs under no_grad,
never syncs with the host, and hands the call to the hot path as exactly one op
(:mod:`moewatch.hotpath.ops`): ``stage`` for CPU gates, ``observe`` elsewhere. The adapter's
``extract`` and this hook are plain tensor plumbing that ``torch.compile`` traces without a
graph break; failures are swallowed and counted, never raised into the model's forward.
"""
from __future__ import annotations

import torch

from .adapters.base import GateSpec, width_error
from .errors import ErrorLog
from .hotpath import ops  # noqa: F401  (registers the moewatch:: ops)
from .hotpath.device import DeviceBank


_is_compiling = torch.compiler.is_compiling
# torch.export makes a program to run elsewhere: moewatch's ops there would call into whatever
# monitor holds the same bank number in that process. Exported, the hooks add nothing.
is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_grad_enabled = torch.is_grad_enabled  # with grad, the output carries the graph: detach it now
# Which backward pass runs on this thread (-1: none). A gate called inside one is activation
# checkpointing running again a forward whose routing was counted when it first ran.
recomputing = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class Unwatched:
    """What a copy of a monitored model holds where the original holds moewatch's hooks: a hook
    that does nothing. ``copy.deepcopy(model)`` (a reference model, an EMA copy) and pickling
    the whole model (``torch.save(model)``) copy its hooks with it; moewatch's hooks hold the
    monitor (its locks, threads, accumulators), which neither copies nor pickles, and a copy's
    traffic is not the original's. Attach to a copy to watch it."""

    def __call__(self, *args, **kwargs) -> None:
        return None

    def __repr__(self) -> str:
        return "<moewatch hook of a copied model: not watched>"


def _unwatched(hook) -> tuple:  # a hook's __reduce__
    return (Unwatched, ())


class GateHook:
    __reduce__ = _unwatched  # a copy of the model does not share the monitor (see Unwatched)

    def __init__(self, spec: GateSpec, bank, row: int, errors: ErrorLog):
        self.extract = spec.extract
        self.name = spec.info.name
        self.num_experts = spec.info.num_experts
        self.bank = bank
        self.bank_id = bank.bank_id
        self.row = row
        self.errors = errors
        self.on_device = isinstance(bank, DeviceBank)
        self.stage = None if self.on_device else bank.stage
        # Eager CPU gates whose extract reads the output alone keep the output as it is; the
        # reader extracts it (StagedBank.stage_output): the fewest steps on the forward's thread.
        self.stage_output = None
        if (not self.on_device and getattr(spec.extract, "output_only", False) and not spec.companions
                and spec.install is None):
            bank.set_extract(row, spec.extract, self.num_experts)
            self.stage_output = bank.stage_output

    def _refuse_width(self, width: int) -> None:
        """A gate whose logits do not match its attached width: counted on every call (the
        verdict says monitoring is failing), with what to do, and nothing staged."""
        self.errors.record("hook", width_error(self.name, width, self.num_experts), where=self.name)

    def __call__(self, module, args, kwargs, output):
        # No no_grad() here: staging runs no autograd op, and the device backend's op
        # implementation sets it itself; the context manager alone costs microseconds.
        # Every line here runs on every gate call: locals, no helper calls where a test will do.
        try:
            if self.stage_output is not None and not _grad_enabled() and not _is_compiling():
                # eager inference on the CPU: the output is kept, the reader reads it (or, where
                # it cannot be kept as it is, stage_output reads it now)
                self.stage_output(self.row, output)
                return None
            if _is_compiling():
                if is_exporting():
                    return None
            elif recomputing() != -1:  # (compiled code does not run the op again in the backward pass)
                return None
            routing = self.extract(module, args, kwargs, output)
            logits = routing.logits  # [T, E]
            if logits.requires_grad:  # training: keep the history out of what is held
                logits = logits.detach()
            if logits.shape[-1] != self.num_experts:  # a shape, not a value: traceable
                self._refuse_width(logits.shape[-1])
                return None
            probs = routing.probs  # [T, E] or None
            if probs is not None and probs.requires_grad:
                probs = probs.detach()
            grid = routing.grid or 0
            if _is_compiling():  # traced: exactly one opaque op in the graph
                bank = self.bank
                if self.on_device:
                    torch.ops.moewatch.observe(logits, routing.indices, probs, routing.dropped, routing.valid,
                                               routing.positions, bank.sums, bank.counts, bank.absmax,
                                               self.bank_id, self.row, grid)
                elif (probs is None and routing.dropped is None and routing.valid is None
                      and routing.positions is None and grid == 0 and routing.indices is not None):
                    # the commonest call: the op's overload of five arguments (stage.routing)
                    torch.ops.moewatch.stage(logits, routing.indices, bank.token, self.bank_id, self.row)
                else:
                    torch.ops.moewatch.stage(logits, routing.indices, probs, routing.dropped, routing.valid,
                                             routing.positions, bank.token, self.bank_id, self.row, grid)
            elif self.on_device:  # eager: the ops' implementations, without the dispatcher's round trip
                bank = self.bank
                bank.observe(self.row, logits, routing.indices, probs, routing.dropped, routing.valid,
                             routing.positions, grid, bank.sums, bank.counts, bank.absmax)
            else:  # eager tensors stay alive, and their version counters tell if they change
                self.stage(self.row, logits, routing.indices, probs, routing.dropped, routing.valid,
                           routing.positions, grid, False)
        except Exception as error:  # never raise into the model's forward
            self.errors.record("hook", error, where=self.name)
        return None


class CompanionHook:
    """An adapter's helper hook (see ``adapters.base.Companion``), guarded like the gate hook."""

    __reduce__ = _unwatched

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
