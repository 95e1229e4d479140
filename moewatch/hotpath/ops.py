"""The registered ops of the hot path: what compiled code sees of moewatch.

``torch.compile`` traces the monitor's forward hooks into the model's graph. Each gate call
becomes exactly one of these ops, an opaque node with a fake implementation and declared
mutations (or side effects), so Dynamo neither breaks the graph nor looks inside:

- ``moewatch::stage``   CPU gates: record the call for the reader (``staged.StagedBank``);
  its ``routing`` overload takes the commonest call's five arguments only.
- ``moewatch::observe`` other devices: compute every statistic and add it into the device
  accumulators (one Triton kernel on CUDA, the torch reference elsewhere; ``device.DeviceBank``).

and each root forward adds ``moewatch::forward_begin`` / ``forward_end``: the forward boundary
that windows are cut at, and the padding mask of the call, which the gate ops read at run time
from their thread's state (the root module's hooks run outside the compiled frame, so the mask
cannot reach the gates as a value of the forward's graph). The banks live in a registry keyed by an integer, because an op's
arguments are tensors and scalars only.

In eager mode the hooks call the banks' implementations directly: the dispatcher's round trip
would cost the forward microseconds for nothing.
"""
from __future__ import annotations

import itertools
import threading
from typing import Dict, Optional

import torch

_BANKS: Dict[int, object] = {}
_NEXT_ID = itertools.count(1)
_REGISTRY_LOCK = threading.Lock()

_CALL_ARGS = "Tensor logits, Tensor? indices, Tensor? probs, Tensor? dropped, Tensor? valid, Tensor? positions"

_LIB = torch.library.Library("moewatch", "DEF")
# stage mutates nothing that compiled code can see: the call's statistics reach the
# accumulators later, on the reader's thread (handed to compiled code, the accumulators could be
# copied back over the reader's adds). It is kept by being declared side-effecting (below), not
# by a declared mutation: a mutating node in the middle of the graph changes how inductor fuses
# the model's own kernels around it, and with them the rounding of its outputs (measured: a tiny
# Mixtral's logits off by 1 ulp in 43% of places with AVX-512). ``token`` is read only: the
# forward ops' ``ticks``, which orders each gate's op between its forward's begin and end where
# they are traced into one graph (a model called inside a bigger compiled function).
_LIB.define(f"stage({_CALL_ARGS}, Tensor token, int bank, int row, int grid) -> ()")
# The same op for the commonest call, the logits [T, E] and the router's own ids [T, k] alone:
# compiled code calls it through the dispatcher into Python at every gate call, and each argument
# costs that round trip (about 2.7 us for these five, 4.4 us for the ten above).
_LIB.define("stage.routing(Tensor logits, Tensor indices, Tensor token, int bank, int row) -> ()")
_LIB.define(f"observe({_CALL_ARGS}, Tensor(a!) sums, Tensor(b!) counts, Tensor(c!) absmax, int bank, int row, "
            "int grid) -> ()")
# rows: [B, L, continued] of the root forward's input (its shape: symbolic under dynamic shapes), or None
_LIB.define("forward_begin(Tensor? mask, Tensor? decoder_mask, Tensor(a!) ticks, int bank, SymInt[]? rows=None) -> ()")
_LIB.define("forward_end(Tensor(a!) ticks, int bank) -> ()")


def register(bank) -> int:
    """Make a bank reachable from the ops; returns its id."""
    with _REGISTRY_LOCK:
        bank_id = next(_NEXT_ID)
        _BANKS[bank_id] = bank
    return bank_id


def unregister(bank_id: int) -> None:
    with _REGISTRY_LOCK:
        _BANKS.pop(bank_id, None)


def _bank(bank_id: int):
    return _BANKS.get(bank_id)


# -- implementations (also called directly by the eager hooks) --------------------------------
def _stage_impl(logits, indices, probs, dropped, valid, positions, token, bank, row, grid):
    target = _BANKS.get(bank)
    if target is not None:  # detached: compiled code may still call in; it counts nothing
        try:  # compiled code calls this outside the hook's guard: never raise into the model
            # compiled code reuses its buffers after the op returns: the bank copies the tensors
            target.stage(row, logits, indices, probs, dropped, valid, positions, grid, True)
        except Exception as error:
            target.errors.record("hook", error, where=target.gates[row].name)


def _stage_routing_impl(logits, indices, token, bank, row):
    target = _BANKS.get(bank)
    if target is not None:
        try:  # as _stage_impl
            target.stage_copy(row, logits, indices)
        except Exception as error:
            target.errors.record("hook", error, where=target.gates[row].name)


def _observe_impl(logits, indices, probs, dropped, valid, positions, sums, counts, absmax, bank, row, grid):
    target = _BANKS.get(bank)
    if target is not None:
        try:  # as _stage_impl
            target.observe(row, logits, indices, probs, dropped, valid, positions, grid, sums, counts, absmax)
        except Exception as error:
            target.errors.record("hook", error, where=target.gates[row].name)


def _begin_impl(mask, decoder_mask, ticks, bank, rows=None):
    target = _BANKS.get(bank)
    if target is not None:
        target.begin(mask, decoder_mask, None if rows is None else (int(rows[0]), int(rows[1]), bool(rows[2])))


def _end_impl(ticks, bank):
    target = _BANKS.get(bank)
    if target is not None:
        target.end(ticks)


_LIB.impl("stage", _stage_impl, "CompositeExplicitAutograd")
_LIB.impl("stage.routing", _stage_routing_impl, "CompositeExplicitAutograd")
_LIB.impl("observe", _observe_impl, "CompositeExplicitAutograd")
_LIB.impl("forward_begin", _begin_impl, "CompositeExplicitAutograd")
_LIB.impl("forward_end", _end_impl, "CompositeExplicitAutograd")


def _no_output(*args, **kwargs) -> None:
    return None


for _name in ("stage", "stage.routing", "observe", "forward_begin", "forward_end"):
    torch.library.register_fake(f"moewatch::{_name}", _no_output, lib=_LIB)
for _overload in (torch.ops.moewatch.stage.default, torch.ops.moewatch.stage.routing):
    torch.fx.node.has_side_effect(_overload)  # no output, no mutation: never dropped


def registered(bank_id: int) -> Optional[object]:
    return _bank(bank_id)
