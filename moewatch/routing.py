"""The per-call view of one gate's decision that every adapter produces.

Adapters translate whatever a family's router returns into a :class:`Routing`;
the statistics code only ever sees this one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

SCORINGS = ("softmax", "sigmoid")


@dataclass
class Routing:
    """One gate call, normalised.

    logits:  [T, E] raw router logits (any float dtype; non-finite values allowed).
    indices: [T, k] expert ids the router selected (any integer dtype: int64, an engine's int32),
             or None to take the top-k of the scores.
    dropped: [T, k] bool, True where the selected expert refused the token (capacity), or None.
    probs:   [T, E] routing distribution when the family's gate already computed it
             (rows sum to 1), or None to derive it from the logits with ``scoring``.
    valid:   [T] bool override of which tokens are traffic (the padding mask is used otherwise).
    positions: [T] int64 place of each routed token in the call's flattened [B*S] token grid,
             for gates that see a gathered subset of the tokens (modality-isolated experts);
             the padding mask is then read at these places. None: the gate saw every token.
    grid:    B*S, the size of that token grid (set together with ``positions``).
    """

    logits: torch.Tensor
    indices: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    grid: Optional[int] = None


@dataclass(frozen=True)
class GateInfo:
    """A monitored gate, as listed by :attr:`moewatch.Monitor.gates`."""

    name: str
    num_experts: int
    top_k: int
    family: str
    scoring: str = "softmax"
    native_capacity: bool = False
    notes: str = field(default="", compare=False)
