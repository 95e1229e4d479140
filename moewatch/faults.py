"""Fault injection at the gates, for drills, the detection benchmark and tests.

Each fault is a transform on a gate module's tap (:mod:`moewatch.taps`) that rewrites what the
gate returns: its logits and, for routers that return ``(logits, weights, indices, ...)``, the
top-k decision recomputed from the faulted logits, so the model's experts really receive the
faulted routing. A tap runs its transforms before moewatch's own gate observer, whichever was
added first, so the monitor sees the faulted output. Every fault is reversible --
``fault.remove()`` or leaving its ``with`` block restores the model exactly.

    with moewatch.faults.two_expert_collapse(model, experts=(0, 1)):
        model(input_ids)   # most tokens now go to experts 0 and 1

The faults:

* :func:`two_expert_collapse` -- a bias on two experts' logits (a router collapse onto two experts);
* :func:`dead_expert` -- one expert's logit pushed below every other: it is never chosen;
* :func:`saturate` -- logits scaled (x8 by default): near one-hot routing, same ranking;
* :func:`capacity_squeeze` -- a bias that overloads experts past their capacity. Mixtral-style
  routers are dropless; attach the monitor with ``capacity_factor=`` (e.g. 1.25) and it counts
  the assignments a capacity-limited deployment would drop -- the squeeze makes them spike;
* :func:`logit_fault` -- any ``[T, E] -> [T, E]`` transform of the logits.

Biases are in units of the per-token standard deviation of the gate's own logits, so one
strength means the same on any model.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from types import SimpleNamespace

from .adapters.hf_families import TRIPLE_FAMILIES
from .discovery import GatesOption, resolve_gates
from .engines import engine_for
from .taps import add_transform

# transform(logits [T, E] float32) -> [T, E] float32
LogitTransform = Callable[[torch.Tensor], torch.Tensor]


class Fault:
    """An injected fault: hooks on some gates. A context manager; ``remove()`` undoes it."""

    def __init__(self, name: str, description: str, gates: List[str], handles: list):
        self.name = name
        self.description = description
        self.gates = gates  # names of the faulted gate modules
        self._handles = handles

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Take the fault out; the gates behave as before. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "Fault":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<moewatch.Fault {self.name} ({state}) on {len(self.gates)} gate(s): {self.description}>"


# Gates whose output _reroute understands: logits alone, (logits, weights, indices, ...), or
# (logits, extra) pairs such as vLLM's (logits, None) (the engine routes the faulted logits).
FAULTABLE_FAMILIES = frozenset(TRIPLE_FAMILIES) | {"custom", "dbrx", "vllm"}
# Families whose gate returns its own decision, recomputed here from the faulted logits (softmax).
_REROUTED_FAMILIES = frozenset(TRIPLE_FAMILIES) | {"dbrx"}


def _logit_scale(logits: torch.Tensor) -> torch.Tensor:
    """[T, E] -> [T, 1]: each token's spread of logits (a model-independent unit for biases)."""
    return logits.std(dim=-1, keepdim=True).clamp_min(1e-6)


def _reroute(output, logits: torch.Tensor, top_k: int):
    """The gate's output with ``logits`` [T, E] in place of its own, decisions recomputed."""
    if isinstance(output, torch.Tensor):
        return logits.reshape(output.shape).to(output.dtype)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) and (
            len(output) < 3 or not isinstance(output[2], torch.Tensor)):
        # (logits, None), (logits, bias): whoever routes downstream routes the faulted logits
        first = logits.reshape(output[0].shape).to(output[0].dtype)
        return type(output)((first,) + tuple(output[1:])) if isinstance(output, tuple) else [first, *output[1:]]
    if not (isinstance(output, (tuple, list)) and len(output) >= 3):
        raise TypeError(f"cannot inject a fault into a gate returning {type(output).__name__}; "
                        "supported: logits, (logits, extra), or (logits, weights, indices, ...)")
    old_logits, old_weights, old_indices = output[0], output[1], output[2]
    top_k = old_indices.shape[-1] if old_indices.dim() else top_k  # the gate's own k
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    weights, indices = torch.topk(probs, top_k, dim=-1)  # [T, k]
    # Keep the family's convention: renormalised top-k weights when the gate renormalises.
    old_sums = old_weights.reshape(-1, old_weights.shape[-1]).float().sum(dim=-1)
    if torch.allclose(old_sums, torch.ones_like(old_sums), atol=1e-3):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    new = (logits.reshape(old_logits.shape).to(old_logits.dtype),
           weights.reshape(old_weights.shape).to(old_weights.dtype),
           indices.reshape(old_indices.shape).to(old_indices.dtype))
    return type(output)(new + tuple(output[3:])) if isinstance(output, tuple) else list(new) + list(output[3:])


def _fault_specs(model: nn.Module, gates: GatesOption, top_k: Optional[int], num_experts: Optional[int]):
    """The gates a fault can go on: a serving engine's, known router classes, or ``gates=``
    modules (their k and width are not needed to fault their logits)."""
    engine = engine_for(model)
    if engine is not None:
        return engine.gates(model, SimpleNamespace(gates=gates))
    return resolve_gates(model, gates, top_k if top_k is not None else 1, "softmax", num_experts)


def logit_fault(model: nn.Module, transform: LogitTransform, name: str = "logit_fault",
                description: str = "", gates: GatesOption = None,
                layers: Optional[Sequence[int]] = None, top_k: Optional[int] = None,
                num_experts: Optional[int] = None) -> Fault:
    """Apply ``transform`` to the logits of the model's gates (all, or ``gates=`` / ``layers=``).

    ``gates`` is a pattern or names as for :func:`moewatch.attach` (your own gate modules
    included: their output, or its first element, is faulted, e.g. ``(logits, None)``);
    ``layers`` picks gates by their position in the model (0 = first gate). ``num_experts``:
    only for gates= modules whose width cannot be read (``top_k`` is accepted and unused: a
    returned decision is recomputed with the gate's own k, with softmax). On a vLLM model the
    fault goes on each MoE layer's gate module and vLLM routes the faulted logits; with
    compilation on, inject before the engine compiles (a hook added later is not in its graph).
    """
    specs = _fault_specs(model, gates, top_k, num_experts)
    if layers is not None:
        wanted = set(layers)
        bad = sorted(wanted - set(range(len(specs))))
        if bad:
            raise ValueError(f"layers={sorted(wanted)}: the model has {len(specs)} gates (0..{len(specs) - 1})")
        specs = [s for i, s in enumerate(specs) if i in wanted]
    for spec in specs:
        if spec.info.scoring != "softmax" and spec.info.family in _REROUTED_FAMILIES:
            raise ValueError(f"gate {spec.info.name!r} scores with {spec.info.scoring} and returns its own "
                             "decision, which faults recompute with softmax: faults support softmax routers there")
        if spec.info.family not in FAULTABLE_FAMILIES:
            raise ValueError(
                f"gate {spec.info.name!r} ({spec.info.family}) does not return its logits first, or "
                "(logits, weights, indices): faults support those gates only (user gates named with "
                "gates=, DBRX and the standard transformers families)")
    handles = []
    for spec in specs:
        top_k = spec.info.top_k

        def hook(module, args, output, _top_k=top_k):
            logits = output if isinstance(output, torch.Tensor) else output[0]
            faulted = transform(logits.reshape(-1, logits.shape[-1]).float())  # [T, E]
            return _reroute(output, faulted, _top_k)

        handles.append(add_transform(spec.module, hook))
    return Fault(name, description, [s.info.name for s in specs], handles)


def _experts_arg(experts: Union[int, Sequence[int]]) -> List[int]:
    return [experts] if isinstance(experts, int) else [int(e) for e in experts]


def biased(model: nn.Module, experts: Union[int, Sequence[int]], strength: float, name: str = "bias",
           description: str = "", **where) -> Fault:
    """Add ``strength`` (in units of each token's logit spread) to the logits of ``experts``."""
    chosen = _experts_arg(experts)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)  # [E]
        bias[chosen] = strength
        return logits + _logit_scale(logits) * bias

    return logit_fault(model, transform, name, description or f"+{strength:g} sd on experts {chosen}", **where)


def two_expert_collapse(model: nn.Module, experts: Sequence[int] = (0, 1), strength: float = 3.0,
                        **where) -> Fault:
    """A bias that sends most tokens to two experts (router collapse)."""
    if len(_experts_arg(experts)) != 2:
        raise ValueError(f"experts={experts!r}: name two experts")
    return biased(model, experts, strength, "two_expert_collapse",
                  f"bias +{strength:g} sd on experts {list(experts)}", **where)


def dead_expert(model: nn.Module, expert: int = 0, margin: float = 2.0, **where) -> Fault:
    """Expert ``expert`` is never chosen: its logit is set ``margin`` sd below the token's lowest.

    The logit stays finite (a dead expert, not a non-finite-logit fault) and close to the
    others, so the fault does not also look like saturation.
    """

    def transform(logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[:, expert] = logits.min(dim=-1).values - margin * _logit_scale(logits)[:, 0]
        return out

    return logit_fault(model, transform, "dead_expert", f"expert {expert} never chosen", **where)


def saturate(model: nn.Module, scale: float = 8.0, **where) -> Fault:
    """Logits scaled by ``scale``: the same top-k, near one-hot weights (logit saturation)."""
    return logit_fault(model, lambda logits: logits * scale, "saturation", f"logits x{scale:g}", **where)


def capacity_squeeze(model: nn.Module, experts: Union[int, Sequence[int]] = 0, strength: float = 1.5,
                     **where) -> Fault:
    """Overload ``experts`` so that they exceed their capacity and tokens are dropped.

    A moderate bias: the experts take several times their share, far from a collapse. For a
    dropless router, attach the monitor with ``capacity_factor=`` to count the drops.
    """
    return biased(model, experts, strength, "capacity_squeeze",
                  f"experts {_experts_arg(experts)} overloaded (+{strength:g} sd)", **where)


__all__ = ["Fault", "biased", "capacity_squeeze", "dead_expert", "logit_fault", "saturate",
           "two_expert_collapse"]
