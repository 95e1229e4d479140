"""The readable torch implementation of one gate call's statistics: the oracle of every backend.

It runs on any device with tensor ops only: nothing here reads a value back to the host (no
``.item()``, ``.cpu()``, ``.tolist()``, ``nonzero``, boolean-mask indexing or ``bincount``).
Every per-token quantity is stacked into one [C, T] table and reduced with one weighted sum.

It is used three ways: as the oracle the fused backends are tested against, as the fallback on
devices without a fused kernel, and by the CPU backend's reader, which runs it once over many
gate calls at a time (``call_ids`` keeps per-call quantities, the would-be drops, per call).

Expert placement (``moewatch.placement``) adds two per-token quantities, both from the chosen
experts of each traffic token as a set: the co-selection pairs (:func:`coselection`) and the
ranks a token must be sent to under a placement (:func:`rank_tokens`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import NUM_SCALARS, RANK_TOKENS, SIGMOID, SOFTMAX


class GateSums(NamedTuple):
    """What one gate call (or a batch of calls) adds to its gate's accumulators."""

    scalars: torch.Tensor  # float64 [NUM_SCALARS]
    prob_sum: torch.Tensor  # float64 [E]
    counts: torch.Tensor  # int64 [E] assignments
    drops: Optional[torch.Tensor]  # int64 [E] dropped assignments, or None
    absmax: torch.Tensor  # float64 [] max |finite logit| over traffic tokens
    cosel: Optional[torch.Tensor] = None  # int64 [E, E] co-selection, upper triangle (see layout)
    rank_tokens: Optional[torch.Tensor] = None  # int64 [E] traffic tokens with an expert on rank r (r < R)


def scoring_code(scoring) -> int:
    if isinstance(scoring, int):
        return scoring
    return SIGMOID if scoring == "sigmoid" else SOFTMAX


def routing_probs(logits: torch.Tensor, scoring) -> torch.Tensor:
    """[T, E] finite float32 logits -> [T, E] routing distribution (rows sum to 1).

    Softmax families use the softmax. For sigmoid families the per-expert scores do not sum
    to one, so the distribution is the scores normalised per token.
    """
    if scoring_code(scoring) == SOFTMAX:
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def mask_columns(mask: Optional[torch.Tensor], num_tokens: int, positions: Optional[torch.Tensor] = None,
                 grid: int = 0) -> Optional[int]:
    """S: the gate saw the last S positions of each row of the padding mask [B, L]; None: no mask applies.

    The gate saw B*S tokens (or, with ``positions`` [T], a gathered subset of a grid of
    ``grid`` = B*S tokens). A mask that does not fit the call's shape does not apply: then every
    token counts. Shapes only: the fused backends make the same decision on the host.
    """
    if mask is None or mask.dim() != 2:
        return None
    batch, length = mask.shape
    width = grid if positions is not None else num_tokens
    if batch == 0 or width % batch or width // batch > length:
        return None
    return width // batch


def mask_tail(mask: Optional[torch.Tensor], num_tokens: int, positions: Optional[torch.Tensor] = None,
              grid: int = 0) -> Optional[torch.Tensor]:
    """The columns of the padding mask [B, L] that a call's tokens sit at: a [B, S] view, or None.

    Long contexts make the mask wide while a decode call covers one column; keeping the tail
    only keeps staged copies small. :func:`mask_weights` gives the same weights for the tail.
    """
    seq = mask_columns(mask, num_tokens, positions, grid)
    return None if seq is None else mask[:, mask.shape[1] - seq:]


def mask_weights(mask: Optional[torch.Tensor], num_tokens: int, positions: Optional[torch.Tensor] = None,
                 grid: int = 0) -> Optional[torch.Tensor]:
    """[T] float32 weights (1 = real token, 0 = padding) from the root call's padding mask [B, L],
    or None (no mask applies: every token counts); see :func:`mask_columns`."""
    tail = mask_tail(mask, num_tokens, positions, grid)  # [B, S] or None
    if tail is None:
        return None
    weights = (tail != 0).reshape(-1).to(torch.float32)  # [B*S]
    if positions is not None:
        weights = weights.index_select(0, positions.to(weights.device).long())  # [T]
    return weights


def gate_sums(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    scoring,
    top_k: int,
    probs: Optional[torch.Tensor] = None,
    dropped: Optional[torch.Tensor] = None,
    capacity_factor: float = 0.0,
    call_ids: Optional[torch.Tensor] = None,
    num_calls: int = 1,
    ranks: Optional[torch.Tensor] = None,
    coselect: bool = False,
) -> GateSums:
    """Reduce one gate call (or a batch of calls of one gate) to fixed-size sums.

    logits [T, E]; indices [T, k] int64 or None (then the top-k of the scores); valid [T] float
    (1 = traffic) or None; probs [T, E] or None (then derived from the logits with ``scoring``);
    dropped [T, k] bool or None. With ``capacity_factor`` > 0 and no ``dropped``, the drops are
    the would-be drops of a capacity-limited layer, per call: ``call_ids`` [T] int64 says which
    of ``num_calls`` calls each token came from (None: one call). ``coselect``: also the
    co-selection counts [E, E]; ``ranks`` [E] int64 (each expert's rank, in [0, E)) or None:
    also the traffic tokens per rank [E].

    The work is done in an expert-major [E, T] layout: reductions over the few experts then
    run as element-wise ops across E rows, vectorised over tokens, which on CPU is several
    times faster than reducing a narrow last dimension. Sums are reduced in float64 and
    counts in int64, so a batch of many calls adds exactly what the calls one by one add.
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
    if probs is None and scoring_code(scoring) == SOFTMAX:
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
    slots = indices.long()  # [T, k]
    nonfinite_count = nonfinite.sum(dim=0, dtype=x.dtype)  # [T]
    per_token = torch.stack([  # [NUM_SCALARS, T]
        torch.ones_like(lse),
        entropy,
        x.sum(dim=0),
        (x * x).sum(dim=0),
        num_experts - nonfinite_count,
        top1,
        top1 - second,
        lse * lse,
        nonfinite_count,
    ])
    table = torch.cat([per_token, p], dim=0)  # [NUM_SCALARS + E, T] float32
    if valid is None:
        total = table.sum(dim=1, dtype=torch.float64)  # [C]: summed in float64, no float64 copy
        absmax = x.abs().amax() if num_tokens else x.new_zeros(())
        token_weight = torch.ones(num_tokens, dtype=torch.int64, device=x.device)  # [T]
    else:
        w = valid.to(device=x.device, dtype=torch.float64)  # [T]
        total = table.double() @ w  # [C]
        absmax = (x.abs() * w.to(x.dtype)).amax() if num_tokens else x.new_zeros(())
        token_weight = (w != 0).to(torch.int64)  # [T]
    slot_weight = token_weight.unsqueeze(1).expand_as(slots)  # [T, k]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).index_add_(
        0, slots.reshape(-1), slot_weight.reshape(-1))  # [E]
    drops = None
    if dropped is not None:
        drops = torch.zeros(num_experts, dtype=torch.int64, device=x.device).index_add_(
            0, slots.reshape(-1), (slot_weight * dropped.to(torch.int64)).reshape(-1))  # [E]
    elif capacity_factor > 0:
        drops = would_be_drops(slots, token_weight, top_k, capacity_factor, call_ids, num_calls, num_experts)
    cosel = coselection(slots, token_weight, num_experts) if coselect else None
    touched = rank_tokens(slots, token_weight, ranks) if ranks is not None else None
    return GateSums(total[:NUM_SCALARS], total[NUM_SCALARS:], counts, drops, absmax.double(), cosel, touched)


def coselection(slots: torch.Tensor, token_weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Co-selection of the traffic tokens: int64 [E, E], upper triangle with the diagonal.

    slots [T, k] int64 expert ids, token_weight [T] int64 (0 = padding). ``[i, j]`` (i < j): tokens
    whose experts include i and j; ``[i, i]``: tokens that chose i. A token's experts are a set:
    an id named twice counts once (only the slot that names it first is kept). One
    ``index_add_`` over the k(k+1)/2 slot pairs, each pair at (min id, max id). Slot-major
    [k, T] throughout: gathering whole rows is several times faster on CPU than gathering
    columns of [T, k], and no sort is needed.
    """
    num_tokens, k = slots.shape
    device = slots.device
    ids = slots.t().contiguous()  # [k, T]
    keep = (token_weight != 0).unsqueeze(0).expand(k, num_tokens)  # [k, T]
    if k > 1:  # a slot is kept where no earlier slot of its token names the same expert
        i, j = torch.triu_indices(k, k, offset=1, device=device)  # [P'] slot pairs i < j
        same = (ids.index_select(0, i) == ids.index_select(0, j)).to(torch.int64)  # [P', T]
        repeats = torch.zeros(k, num_tokens, dtype=torch.int64, device=device).index_add_(0, j, same)  # [k, T]
        keep = keep & (repeats == 0)  # [k, T]
    a, b = torch.triu_indices(k, k, device=device)  # [P] slot pairs a <= b
    u, v = ids.index_select(0, a), ids.index_select(0, b)  # [P, T]
    flat = torch.minimum(u, v) * num_experts + torch.maximum(u, v)  # [P, T] < E*E, in the upper triangle
    weight = (keep.index_select(0, a) & keep.index_select(0, b)).to(torch.int64)  # [P, T]
    out = torch.zeros(num_experts * num_experts, dtype=torch.int64, device=device)  # [E*E]
    return out.index_add_(0, flat.reshape(-1), weight.reshape(-1)).view(num_experts, num_experts)


def rank_tokens(slots: torch.Tensor, token_weight: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """int64 [E]: per rank r (< R <= E), the traffic tokens with at least one expert on rank r.

    slots [T, k] int64, token_weight [T] int64 (0 = padding), ranks [E] int64 in [0, E). Summed
    over ranks: the number of (token, rank) sends of an all-to-all dispatch.
    """
    num_experts = ranks.shape[0]
    on = ranks.to(slots.device).long()[slots].sort(dim=1).values  # [T, k] ranks of the chosen experts, ascending
    first = torch.ones_like(on, dtype=torch.bool)  # [T, k] the first slot naming its rank
    if on.shape[1] > 1:
        first[:, 1:] = on[:, 1:] != on[:, :-1]
    keep = (first & (token_weight != 0).unsqueeze(1)).to(torch.int64)  # [T, k]
    out = torch.zeros(num_experts, dtype=torch.int64, device=slots.device)  # [R <= E]
    return out.index_add_(0, on.reshape(-1), keep.reshape(-1))


def would_be_drops(slots: torch.Tensor, token_weight: torch.Tensor, top_k: int, capacity_factor: float,
                   call_ids: Optional[torch.Tensor], num_calls: int, num_experts: int) -> torch.Tensor:
    """Assignments over capacity per expert, summed over calls, for a dropless gate.

    capacity = ceil(tokens * k / E * capacity_factor) per call, as capacity-limited MoE layers
    set it. slots [T, k] int64, token_weight [T] int64 (0 = padding), call_ids [T] or None ->
    int64 [E].
    """
    device = slots.device
    calls = torch.zeros(slots.shape[0], dtype=torch.int64, device=device) if call_ids is None else call_ids
    per_call = torch.zeros(num_calls * num_experts, dtype=torch.int64, device=device)  # [N*E]
    flat = (calls.unsqueeze(1) * num_experts + slots).reshape(-1)  # [T*k]
    per_call.index_add_(0, flat, token_weight.unsqueeze(1).expand_as(slots).reshape(-1))
    tokens = torch.zeros(num_calls, dtype=torch.int64, device=device).index_add_(0, calls, token_weight)  # [N]
    # float64, in the documented order, so the result equals math.ceil on the host.
    capacity = torch.ceil(tokens.double() * top_k / num_experts * capacity_factor)  # [N]
    over = (per_call.view(num_calls, num_experts).double() - capacity.unsqueeze(1)).clamp_min(0)  # [N, E]
    return over.sum(dim=0).to(torch.int64)  # [E]


def accumulate(sums: torch.Tensor, counts: torch.Tensor, absmax: torch.Tensor, row: int, part: GateSums,
               cosel: Optional[torch.Tensor] = None) -> None:
    """Add one :class:`GateSums` into gate ``row`` of the accumulators (see ``layout``);
    ``cosel`` int64 [G, E_max, E_max] or None."""
    num_experts = part.prob_sum.shape[0]
    sums[row, :NUM_SCALARS].add_(part.scalars)
    sums[row, NUM_SCALARS:NUM_SCALARS + num_experts].add_(part.prob_sum)
    counts[row, 0, :num_experts].add_(part.counts)
    if part.drops is not None:
        counts[row, 1, :num_experts].add_(part.drops)
    absmax[row:row + 1] = torch.maximum(absmax[row:row + 1], part.absmax.reshape(1))
    if part.rank_tokens is not None:
        counts[row, RANK_TOKENS, :num_experts].add_(part.rank_tokens)
    if cosel is not None and part.cosel is not None:
        cosel[row, :num_experts, :num_experts].add_(part.cosel)
