"""Routing decisions gathered across data-parallel ranks: this rank's own rows of them.

Some engines gather every data-parallel rank's tokens before routing: vLLM's naive dispatch
(``allgather_reducescatter``) concatenates the ranks' hidden states and router logits, runs the
top-k over all of them, and scatters the results back. The router's decisions then cover more
rows than the logits this rank's gate computed. Counting them all would count every rank's
tokens on every rank and pair decisions with another token's logits; each rank counts its own
rows instead, which its engine places among the gathered ones (``Engine.row_locator``). The
rows are taken as a view with host integers: no op, no sync.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# (rows of this rank, rows gathered) -> the first of this rank's rows among them, or None
Locate = Callable[[int, int], Optional[int]]


def own_decisions(logits: torch.Tensor, indices: Optional[torch.Tensor], locate: Locate) -> Optional[torch.Tensor]:
    """A call's decisions as they are, or, where they cover more token rows than its logits
    [T, E] (gathered: [T_all, k]), this rank's [T, k] view of them, placed by ``locate``.
    Raises ValueError when ``locate`` cannot place them (the call is then counted as an error)."""
    if indices is None or indices.dim() != 2 or logits.dim() != 2 or indices.shape[0] <= logits.shape[0]:
        return indices
    local, gathered = int(logits.shape[0]), int(indices.shape[0])
    start = locate(local, gathered)
    if start is None or start < 0 or start + local > gathered:
        raise ValueError(
            f"the router's decisions cover {gathered} token rows but its gate's logits {local}: "
            "the engine gathered tokens across ranks before routing and did not say which rows are "
            "this rank's; these calls are not counted")
    return indices.narrow(0, start, local)  # [local, k]
