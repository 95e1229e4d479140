"""Per-call routing statistics, computed on the gate's device with tensor ops only.

Nothing here reads a value back to the host: no ``.item()``, ``.cpu()``, ``.tolist()``,
``nonzero``, boolean-mask indexing or ``bincount``. Every per-token quantity is stacked into
one [T, C] matrix and reduced with one weighted sum, so a gate call costs a fixed, small
number of kernels whatever its size, and the same ops replay correctly under CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

# Columns of the per-gate float64 sums (followed by E columns of router-probability sums).
TOKENS, ENTROPY, LOGIT_SUM, LOGIT_SQSUM, LOGIT_FINITE, TOP1, MARGIN, ZLOSS, NONFINITE = range(9)
SCALAR_NAMES = (
    "tokens", "entropy_sum", "logit_sum", "logit_sqsum", "logit_finite",
    "top1_sum", "margin_sum", "zloss_sum", "nonfinite",
)
NUM_SCALARS = len(SCALAR_NAMES)


def routing_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[T, E] finite float32 logits -> [T, E] routing distribution (rows sum to 1).

    Softmax families use the softmax. For sigmoid families the per-expert scores do not sum
    to one, so the distribution is the scores normalised per token.
    """
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def gate_sums(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    scoring: str,
    top_k: int,
    probs: Optional[torch.Tensor] = None,
    dropped: Optional[torch.Tensor] = None,
):
    """Reduce one gate call to fixed-size sums.

    logits [T, E], indices [T, k] int64 or None, valid [T] float (1 = traffic) or None,
    probs [T, E] or None, dropped [T, k] bool or None.

    Returns (scalars [NUM_SCALARS], prob_sum [E], counts [E], drops [E], absmax []):
    float32 tensors on the logits' device; counts and drops hold exact integers.
    """
    num_tokens, num_experts = logits.shape
    x = logits.detach().float()  # [T, E]
    finite = torch.isfinite(x)  # [T, E]
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))  # [T, E]
    if probs is None:
        p = routing_probs(x, scoring)  # [T, E]
    else:
        p = torch.nan_to_num(probs.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    if indices is None:
        indices = torch.topk(p, top_k, dim=-1).indices  # [T, k]
    indices = indices.long()
    assigned = torch.zeros_like(p).scatter_add_(  # [T, E] assignments per token and expert
        1, indices, torch.ones(indices.shape, dtype=p.dtype, device=p.device))
    finite_count = finite.sum(dim=-1, dtype=x.dtype)  # [T]
    if num_experts >= 2:
        top2 = torch.topk(p, 2, dim=-1).values  # [T, 2]
        top1, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    else:
        top1, margin = p[:, 0], p[:, 0]
    lse = torch.logsumexp(x, dim=-1)  # [T]
    per_token = [
        torch.ones_like(top1),
        torch.special.entr(p).sum(dim=-1),
        x.sum(dim=-1),
        (x * x).sum(dim=-1),
        finite_count,
        top1,
        margin,
        lse * lse,
        num_experts - finite_count,
    ]
    columns = [torch.stack(per_token, dim=1), p, assigned]  # [T, NUM_SCALARS], [T, E], [T, E]
    if dropped is not None:
        columns.append(torch.zeros_like(p).scatter_add_(1, indices, dropped.to(p.dtype)))
    table = torch.cat(columns, dim=1)  # [T, C]
    if valid is None:
        total = table.sum(dim=0)  # [C]
        absmax = x.abs().amax() if num_tokens else x.new_zeros(())
    else:
        w = valid.to(device=x.device, dtype=x.dtype)  # [T]
        total = w @ table  # [C]
        absmax = (x.abs() * w[:, None]).amax() if num_tokens else x.new_zeros(())
    scalars = total[:NUM_SCALARS]
    prob_sum = total[NUM_SCALARS:NUM_SCALARS + num_experts]
    counts = total[NUM_SCALARS + num_experts:NUM_SCALARS + 2 * num_experts]
    if dropped is not None:
        drops = total[NUM_SCALARS + 2 * num_experts:]
    else:
        drops = None
    return scalars, prob_sum, counts, drops, absmax


def would_be_drops(counts: torch.Tensor, tokens: torch.Tensor, top_k: int, capacity_factor: float) -> torch.Tensor:
    """Assignments over capacity per expert for one call of a dropless gate.

    capacity = ceil(tokens * k / E * capacity_factor), as capacity-limited MoE layers set it.
    counts [E] float, tokens [] float -> [E] float.
    """
    num_experts = counts.shape[0]
    # float64, in the documented order, so the result equals math.ceil on the host.
    capacity = torch.ceil(tokens.double() * top_k / num_experts * capacity_factor)
    return (counts.double() - capacity).clamp_min(0)
