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

    Returns (scalars [NUM_SCALARS], prob_sum [E], counts [E], drops [E] or None, absmax []):
    float32 tensors on the logits' device; counts and drops hold exact integers.

    The work is done in an expert-major [E, T] layout: reductions over the few experts then
    run as element-wise ops across E rows, vectorised over tokens, which on CPU is several
    times faster than reducing a narrow last dimension.
    """
    num_tokens, num_experts = logits.shape
    raw = logits.detach().float().t().contiguous()  # [E, T]
    x = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)  # [E, T]
    nonfinite = x != raw  # [E, T]: only NaN and +-Inf differ from their replacement (NaN != 0)
    peak = x.amax(dim=0) if num_tokens else x.new_zeros(0)  # [T]
    shifted = x - peak  # [E, T], <= 0
    exp_shifted = torch.exp(shifted)  # [E, T]
    log_norm = torch.log(exp_shifted.sum(dim=0))  # [T]
    lse = peak + log_norm  # [T] logsumexp of the logits
    if probs is None and scoring == "softmax":
        p = exp_shifted / exp_shifted.sum(dim=0)  # [E, T]
        entropy = log_norm - (p * shifted).sum(dim=0)  # [T]: -sum p log p, with log p = shifted - log_norm
    else:
        if probs is None:
            p = routing_probs(x.t(), scoring).t()  # [E, T]
        else:
            p = torch.nan_to_num(probs.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).t()  # [E, T]
        entropy = torch.special.entr(p).sum(dim=0)  # [T]
    top1 = p.amax(dim=0) if num_tokens else p.new_zeros(0)  # [T]
    at_top = p == top1  # [E, T]
    # second largest probability without topk: the max of the others, or top1 itself on a tie
    second = torch.where(at_top, 0.0, p).amax(dim=0) if num_tokens else top1
    second = torch.where(at_top.sum(dim=0) >= 2, top1, second)  # [T]
    if indices is None:
        indices = torch.topk(p.t(), top_k, dim=-1).indices  # [T, k]
    slots = indices.long().t()  # [k, T]
    assigned = torch.zeros_like(p).scatter_add_(  # [E, T] assignments per expert and token
        0, slots, torch.ones(slots.shape, dtype=p.dtype, device=p.device))
    nonfinite_count = nonfinite.sum(dim=0, dtype=x.dtype)  # [T]
    finite_count = num_experts - nonfinite_count  # [T]
    per_token = [
        torch.ones_like(lse),
        entropy,
        x.sum(dim=0),
        (x * x).sum(dim=0),
        finite_count,
        top1,
        top1 - second,
        lse * lse,
        nonfinite_count,
    ]
    rows = [torch.stack(per_token), p, assigned]  # [NUM_SCALARS, T], [E, T], [E, T]
    if dropped is not None:
        rows.append(torch.zeros_like(p).scatter_add_(0, slots, dropped.t().to(p.dtype)))
    table = torch.cat(rows, dim=0)  # [C, T]
    if valid is None:
        total = table.sum(dim=1)  # [C]
        absmax = x.abs().amax() if num_tokens else x.new_zeros(())
    else:
        w = valid.to(device=x.device, dtype=x.dtype)  # [T]
        total = table @ w  # [C]
        absmax = (x.abs() * w).amax() if num_tokens else x.new_zeros(())
    scalars = total[:NUM_SCALARS]
    prob_sum = total[NUM_SCALARS:NUM_SCALARS + num_experts]
    counts = total[NUM_SCALARS + num_experts:NUM_SCALARS + 2 * num_experts]
    drops = total[NUM_SCALARS + 2 * num_experts:] if dropped is not None else None
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
