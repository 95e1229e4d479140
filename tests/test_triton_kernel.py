"""The Triton backend of the hot path against the readable torch reference, on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernel on CPU tensors, atomics included.
It must be on before triton is first imported: ``triton.jit`` and triton's own library functions
(``tl.sum``, ``tl.max``) are built at import, and a process that imported triton without it (any
earlier test that touched torch.compile does) cannot switch. So the kernel checks run in one
child process started with the variable set (``python tests/test_triton_kernel.py --child``),
which prints one JSON line per case; each case is one test here. Host-side behaviour that needs
no kernel (no triton, T = 0, argument checks, one launch per call) is tested in this process.

Placement statistics. Every case (but the exact-ties one) also passes a co-selection accumulator
and a random expert-to-rank placement (R from 1 to E); the co-selection and the tokens per rank
must EQUAL the numpy reference of tests/coselection_numpy.py from the same indices (the call's own,
or the reference's top-k), padding excluded.

Tolerances. Counts, drops (native and capacity), absmax and the integer-valued columns (tokens,
finite and non-finite logit counts) must be EQUAL. The other float sums: |got - want| <=
1e-5 * scale + 1e-6 * tokens, where scale is |want - before| (every per-token value of those
columns is >= 0, so this is a relative tolerance) and, for the logit sum, whose terms cancel,
the weighted sum of |finite logit|. Why: kernel and reference do the same float32 per-token math
on the same upcast inputs (bf16/fp16 upcast exactly to float32, so the bound does not depend on
the input dtype) but with different exp/log implementations and summation orders over experts
(a few float32 ulps, ~1e-7 relative), then float64 sums whose order differs only in ~1e-16;
entropy and margin are differences of O(log E) terms, hence the small absolute floor per token.
Under the interpreter the worst error is ~1.5% of the bound (printed per case with ``-s``); the
margin is for the compiled kernel, whose float32 exp, log and division are approximate (~2 ulp).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the child runs this file as a script
    sys.path.insert(0, str(ROOT))

from moewatch.hotpath import layout, reference  # noqa: E402
from tests.coselection_numpy import numpy_coselection, numpy_rank_tokens  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

RTOL = 1e-5
ATOL_PER_TOKEN = 1e-6
EXACT_COLUMNS = (layout.TOKENS, layout.LOGIT_FINITE, layout.NONFINITE)
G, E_MAX = 3, 256  # accumulator rows and expert columns used by every case
CHILD_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_logits(g, tokens, experts, dtype=torch.float32, *, k=1, clear_top=False, nonfinite=0.0,
                nan_rows=0, scale=1.0, transposed=False) -> torch.Tensor:
    """[T, E] logits. clear_top: the top k of each row are 2.0, 2.5, ... on k random experts above a
    background < 1.5, so the top-k (and its order) is unambiguous in every dtype; non-finite values
    then go to the background only. nan_rows: rows made entirely NaN/Inf."""
    x = (torch.randn(tokens, experts, generator=g) * scale).clamp(-30, 30)  # [T, E]
    if clear_top:
        x = x.clamp(max=1.5)
        top = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :k]  # [T, k]
        x.scatter_(1, top, 2.0 + 0.5 * torch.arange(k, dtype=x.dtype).expand(tokens, k))
    if nonfinite:
        bad = torch.rand(tokens, experts, generator=g) < nonfinite  # [T, E]
        if clear_top:
            bad &= x < 2.0
        kind = torch.randint(0, 3, (tokens, experts), generator=g)
        x = torch.where(bad, torch.tensor([math.nan, math.inf, -math.inf])[kind], x)
    if nan_rows:
        x[torch.randperm(tokens, generator=g)[:nan_rows]] = math.nan
        x[0, : experts // 2] = math.inf  # one row mixing +Inf and NaN
    x = x.to(dtype)
    if transposed:  # non-contiguous: strides (1, T)
        out = torch.empty(experts, tokens, dtype=dtype).t()
        out.copy_(x)
        return out
    return x


def make_indices(g, tokens, experts, k, dtype=torch.int64) -> torch.Tensor:
    return torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :k].to(dtype)  # [T, k] distinct


def right_padded(g, batch, length) -> torch.Tensor:
    lens = torch.randint(1, length + 1, (batch,), generator=g)
    return (torch.arange(length) < lens[:, None]).to(torch.int64)  # [B, L]


def left_padded(g, batch, length) -> torch.Tensor:
    return right_padded(g, batch, length).flip(1)  # [B, L]


def call(logits, *, indices=None, probs=None, dropped=None, valid=None, mask=None, positions=None, grid=0,
         row=0, top_k=1, scoring=layout.SOFTMAX, capacity_factor=0.0) -> dict:
    return dict(logits=logits, indices=indices, probs=probs, dropped=dropped, valid=valid, mask=mask,
                positions=positions, grid=grid, row=row, top_k=top_k, scoring=scoring,
                capacity_factor=capacity_factor)


# ----------------------------------------------------------------------------------------------
# Cases: name -> builder() -> dict(calls=[call(...), ...], tiles: CPU's partition unless "cuda" or
# (elements per tile, most tokens per block), ties: expected counts instead of the reference's)
# ----------------------------------------------------------------------------------------------

CASES: Dict[str, Callable[[], dict]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def t1_e8_k1_fp32_indices():
    g = _gen(1)
    return dict(calls=[call(make_logits(g, 1, 8), indices=make_indices(g, 1, 8, 1), top_k=1)])


@case
def t7_e60_k6_bf16_sigmoid_topk_nonfinite():
    g = _gen(2)
    x = make_logits(g, 7, 60, torch.bfloat16, k=6, clear_top=True, nonfinite=0.1)
    return dict(calls=[call(x, top_k=6, scoring=layout.SIGMOID, row=2)])


@case
def t8191_e8_k2_fp16_indices32_mask_capacity_1024_token_blocks():
    # 8 blocks of 1024 tokens on the interpreter's 4 programs: block loop and drop ticket
    g = _gen(3)
    x = make_logits(g, 8191, 8, torch.float16, nonfinite=0.01, nan_rows=3)
    mask = torch.ones(1, 8191 + 9, dtype=torch.int64)
    mask[0, torch.randperm(8200, generator=g)[:700]] = 0  # B = 1: the only shape 8191 (prime) fits
    return dict(tiles=(8192, 1024), calls=[call(x, indices=make_indices(g, 8191, 8, 2, torch.int32), mask=mask,
                                                top_k=2, capacity_factor=1.0, row=1)])


@case
def t8191_e64_k4_fp32_sigmoid_topk_valid_capacity():
    # CPU partition: 1024-token blocks, 8 blocks on 4 programs, drop ticket
    g = _gen(4)
    x = make_logits(g, 8191, 64, k=4, clear_top=True, nonfinite=0.002)
    valid = torch.rand(8191, generator=g) < 0.9
    return dict(calls=[call(x, valid=valid, top_k=4, scoring=layout.SIGMOID, capacity_factor=1.25)])


@case
def t50_e128_k4_bf16_router_probs_native_drops_float_valid():
    g = _gen(5)
    x = make_logits(g, 50, 128, torch.bfloat16, nonfinite=0.02)
    probs = torch.softmax(torch.randn(50, 128, generator=g), dim=-1)
    probs[3, 5] = math.nan  # the reference nan_to_nums probabilities too
    dropped = torch.rand(50, 4, generator=g) < 0.3
    valid = (torch.rand(50, generator=g) < 0.8).float()
    return dict(calls=[call(x, indices=make_indices(g, 50, 128, 4), probs=probs, dropped=dropped, valid=valid,
                            top_k=4)])


@case
def t33_e256_k8_fp32_topk_left_padded_capacity():
    g = _gen(6)
    x = make_logits(g, 33, 256, k=8, clear_top=True)
    return dict(calls=[call(x, mask=left_padded(g, 3, 11), top_k=8, capacity_factor=2.0, row=2)])


@case
def t300_e60_k6_fp16_topk_right_padded_past_capacity_cuda_tiles():
    # mask [B, L] longer than the call (past positions): the last S columns apply
    g = _gen(7)
    x = make_logits(g, 300, 60, torch.float16, k=6, clear_top=True, nonfinite=0.01)
    return dict(tiles="cuda", calls=[call(x, mask=right_padded(g, 4, 90), top_k=6, capacity_factor=1.0)])


@case
def decode_t6_e64_k2_mask_longer_capacity():
    g = _gen(8)
    x = make_logits(g, 6, 64)
    mask = left_padded(g, 6, 20)
    mask[1, -1] = 0  # a padded slot in the decode column
    return dict(calls=[call(x, indices=make_indices(g, 6, 64, 2), mask=mask, top_k=2, capacity_factor=1.25)])


@case
def positions_t40_grid64_e60_k6_topk():
    g = _gen(9)
    x = make_logits(g, 40, 60, k=6, clear_top=True)
    positions = torch.randperm(64, generator=g)[:40]  # gathered places in a 4 x 16 grid
    return dict(calls=[call(x, mask=right_padded(g, 4, 20), positions=positions, grid=64, top_k=6, row=1)])


@case
def positions_grid_not_fitting_mask_counts_all():
    g = _gen(10)
    x = make_logits(g, 12, 8)
    positions = torch.randperm(30, generator=g)[:12]
    return dict(calls=[call(x, indices=make_indices(g, 12, 8, 2), mask=right_padded(g, 4, 20),
                            positions=positions, grid=30, top_k=2)])  # 30 % 4 != 0


@case
def valid_overrides_mask():
    g = _gen(11)
    x = make_logits(g, 24, 8)
    valid = torch.rand(24, generator=g) < 0.5
    return dict(calls=[call(x, indices=make_indices(g, 24, 8, 2), valid=valid, mask=torch.zeros(4, 6),
                            top_k=2, capacity_factor=1.0)])


@case
def mask_not_fitting_counts_all():
    g = _gen(12)
    x = make_logits(g, 10, 8)
    return dict(calls=[call(x, indices=make_indices(g, 10, 8, 1), mask=right_padded(g, 3, 5), top_k=1)])


@case
def bool_mask_and_decode_shape():
    g = _gen(13)
    x = make_logits(g, 5, 60, torch.bfloat16)
    mask = right_padded(g, 5, 7).bool()
    return dict(calls=[call(x, indices=make_indices(g, 5, 60, 4, torch.int32), mask=mask, top_k=4,
                            scoring=layout.SIGMOID)])


@case
def noncontiguous_logits_and_probs_fp16():
    g = _gen(14)
    x = make_logits(g, 37, 60, torch.float16, transposed=True, nonfinite=0.05)
    probs = torch.softmax(torch.randn(60, 37, generator=g), dim=0).t()  # [T, E] strides (1, T)
    idx = make_indices(g, 37, 60, 6).t().contiguous().t()  # [T, k] strides (1, T)
    return dict(calls=[call(x, indices=idx, probs=probs, top_k=6)])


@case
def router_probs_topk_sigmoid_ignored():
    # probabilities given and no indices: the top-k of the given probabilities
    g = _gen(15)
    probs = torch.softmax(make_logits(g, 20, 64, k=2, clear_top=True), dim=-1)
    return dict(calls=[call(make_logits(g, 20, 64), probs=probs, top_k=2, scoring=layout.SIGMOID)])


@case
def peaked_logits_fp32():
    g = _gen(16)
    return dict(calls=[call(make_logits(g, 64, 128, scale=25.0), indices=make_indices(g, 64, 128, 2), top_k=2)])


@case
def two_rows_and_repeated_calls_capacity_per_call():
    # capacity is per call: three calls into row 1 add three separate would-be-drop counts
    g = _gen(17)
    calls = []
    for i, (t, row) in enumerate([(40, 1), (9, 1), (70, 1), (25, 0), (33, 2)]):
        x = make_logits(g, t, 60, [torch.float32, torch.float16, torch.bfloat16][i % 3], nonfinite=0.02)
        calls.append(call(x, indices=make_indices(g, t, 60, 6), mask=right_padded(g, 1, t + 3) if i == 2 else None,
                          top_k=6, capacity_factor=0.75, row=row))
    return dict(calls=calls)


@case
def repeated_calls_cuda_tiles_shared_scratch():
    # the multi-program drop ticket three times in a row: the scratch must come back to 0 each time
    g = _gen(18)
    sizes = (40, 70, 100)  # 3, 5 and 7 blocks of 16 tokens
    calls = [call(make_logits(g, t, 64), indices=make_indices(g, t, 64, 2), valid=torch.rand(t, generator=g) < 0.7,
                  top_k=2, capacity_factor=1.1, row=i % 2) for i, t in enumerate(sizes)]
    return dict(tiles="cuda", calls=calls)


@case
def capacity_in_float64():
    # ceil(10 * 8 / 8 * 0.1) is 1 in float64 and 2 with 0.1 rounded to float32: drops 9 vs 8
    g = _gen(19)
    x = make_logits(g, 10, 8, k=8, clear_top=True)
    return dict(calls=[call(x, top_k=8, capacity_factor=0.1)])


@case
def single_expert():
    g = _gen(20)
    return dict(calls=[call(make_logits(g, 5, 1), top_k=1), call(make_logits(g, 3, 1), top_k=1,
                                                                   scoring=layout.SIGMOID, row=1)])


@case
def zero_tokens():
    g = _gen(21)
    calls = [call(make_logits(g, 0, 8), top_k=2, capacity_factor=1.0),
             call(make_logits(g, 0, 60), indices=torch.zeros(0, 6, dtype=torch.int64), top_k=6)]
    return dict(calls=calls)


@case
def exact_ties_lowest_expert_first():
    # E = 8, top-2 of rows with exact ties: the kernel takes the lowest expert ids among equals
    # (torch.topk's choice among equals is unspecified, so the counts are checked against this
    # rule; the statistics, margin 0 on a shared maximum included, against the reference)
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0, 3.0, 0.0, 0.0, 0.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      [math.nan, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 1.0, 4.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    want = torch.zeros(8, dtype=torch.int64)
    for e in (1, 2, 0, 1, 1, 3, 0, 2):
        want[e] += 1
    return dict(calls=[call(x, top_k=2)], ties=want)


def _random_case(seed: int) -> Callable[[], dict]:
    def build():
        g = _gen(1000 + seed)
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
        tokens, experts = pick([1, 2, 7, 64, 200]), pick([8, 60, 64, 128, 256])
        k = pick([s for s in (1, 2, 4, 6, 8) if s <= experts])
        dtype = pick([torch.float32, torch.float16, torch.bfloat16])
        router = pick(["indices", "topk", "probs"])
        x = make_logits(g, tokens, experts, dtype, k=k, clear_top=router == "topk", nonfinite=0.03)
        kw = dict(top_k=k, scoring=pick([layout.SOFTMAX, layout.SIGMOID]), row=pick([0, 1, 2]))
        if router == "indices":
            kw["indices"] = make_indices(g, tokens, experts, k, pick([torch.int32, torch.int64]))
        if router == "probs":
            kw["probs"] = torch.softmax(make_logits(g, tokens, experts, k=k, clear_top=True), dim=-1).to(dtype)
        weights = pick(["none", "valid", "mask"])
        if weights == "valid":
            kw["valid"] = torch.rand(tokens, generator=g) < 0.8
        elif weights == "mask":
            batch = pick([b for b in (1, 2, 4) if tokens % b == 0] or [1])
            kw["mask"] = pick([left_padded, right_padded])(g, batch, tokens // batch + pick([0, 3]))
        drops = pick(["none", "native", "capacity"])
        if drops == "native":
            kw["dropped"] = torch.rand(tokens, k, generator=g) < 0.25
        elif drops == "capacity":
            kw["capacity_factor"] = pick([0.5, 1.0, 1.25])
        return dict(calls=[call(x, **kw)])
    build.__name__ = f"random_{seed}"
    return build


for _seed in range(10):
    case(_random_case(_seed))


# ----------------------------------------------------------------------------------------------
# The child: runs every case under the interpreter, one JSON line each
# ----------------------------------------------------------------------------------------------

class LaunchCounter:
    """Stands in for the JIT function: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.grids = kernel, 0, []

    def __getitem__(self, grid):
        self.launches += 1
        self.grids.append(grid)
        return self.kernel[grid]


def _accumulators(g) -> tuple:
    # integer-valued starting sums (the integer columns then stay exact), absmax > 0 on a row
    sums = torch.randint(0, 1000, (G, layout.NUM_SCALARS + E_MAX), generator=g).double()  # [G, C]
    counts = torch.randint(0, 1000, (G, layout.COUNT_ROWS, E_MAX), generator=g)  # [G, 3, E_MAX]
    absmax = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)  # [G]
    return sums, counts, absmax


def _placement(g, experts: int) -> tuple:
    """Co-selection accumulators [G, E_MAX, E_MAX] (random start) and ranks [G, E_MAX]: R random
    ranks for the gate's E experts on every row (R from 1 to E)."""
    cosel = torch.triu(torch.randint(0, 50, (G, E_MAX, E_MAX), generator=g))  # [G, E_MAX, E_MAX]
    num_ranks = int(torch.randint(1, experts + 1, (1,), generator=g))
    ranks = torch.full((G, E_MAX), -1, dtype=torch.int64)  # [G, E_MAX]
    ranks[:, :experts] = torch.randint(0, num_ranks, (G, experts), generator=g)
    return cosel, ranks


def _chosen(c: dict) -> Optional[torch.Tensor]:
    """[T, k] the experts each token chose, as the kernel picks them (the reference's top-k when
    the call has no indices; cases with exact ties carry none)."""
    if c["indices"] is not None:
        return c["indices"].long()
    p = c["probs"]
    if p is None:
        x = torch.nan_to_num(c["logits"].float(), nan=0.0, posinf=0.0, neginf=0.0)
        p = reference.routing_probs(x, c["scoring"])
    else:
        p = torch.nan_to_num(p.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.topk(p, c["top_k"], dim=-1).indices


def _reference_weights(c: dict) -> Optional[torch.Tensor]:
    if c["valid"] is not None:
        return c["valid"]
    return reference.mask_weights(c["mask"], c["logits"].shape[0], c["positions"], c["grid"])


def _on(device: str, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(device)


def run_case(name: str, tb, device: str = "cpu") -> dict:
    """One case through the kernel on ``device`` (the CPU under the interpreter; CUDA compiled, from
    benchmarks/gpu_checks.py), checked on the CPU against the reference and numpy."""
    spec = CASES[name]()
    g = _gen(zlib.crc32(name.encode()))
    sums, counts, absmax = _accumulators(g)
    before = sums.clone()
    want = [sums.clone(), counts.clone(), absmax.clone()]
    logit_scale = torch.zeros(G, dtype=torch.float64)  # [G] sum of w * |finite logit| per row
    tokens = torch.zeros(G, dtype=torch.float64)  # [G] weighted tokens per row
    counter = LaunchCounter(tb._observe_kernel)
    tb._kernel = counter
    # placement statistics: checked against the numpy reference (tests/coselection_numpy.py)
    placed = "ties" not in spec and all(c["logits"].shape[1] == spec["calls"][0]["logits"].shape[1]
                                        for c in spec["calls"])
    cosel, ranks = _placement(g, spec["calls"][0]["logits"].shape[1]) if placed else (None, None)
    want_cosel = None if cosel is None else layout.symmetric(cosel.numpy()).copy()  # [G, E_MAX, E_MAX]
    want_rank_tokens = counts[:, layout.RANK_TOKENS].numpy().copy()  # [G, E_MAX]
    tiles = dict(tb._TILE)
    if spec.get("tiles") == "cuda":  # CUDA's partition: small blocks, several per program
        tb._TILE["cpu"] = tb._TILE["cuda"]
    elif isinstance(spec.get("tiles"), tuple):
        tb._TILE["cpu"] = spec["tiles"]
    # the kernel's accumulators on the device (the same tensors on the CPU), read back after the calls
    on = dict(sums=_on(device, sums), counts=_on(device, counts), absmax=_on(device, absmax),
              cosel=_on(device, cosel), ranks=_on(device, ranks))
    try:
        for c in spec["calls"]:
            tb.observe(*(_on(device, c[key]) for key in ("logits", "indices", "probs", "dropped", "valid", "mask",
                                                          "positions")),
                       c["grid"], on["sums"], on["counts"], on["absmax"], c["row"], c["top_k"], c["scoring"],
                       c["capacity_factor"], cosel=on["cosel"], ranks=on["ranks"])
            w = _reference_weights(c)
            if placed and c["logits"].shape[0]:
                chosen, experts = _chosen(c).numpy(), c["logits"].shape[1]
                weights = None if w is None else w.numpy() != 0
                want_cosel[c["row"], :experts, :experts] += numpy_coselection(chosen, weights, experts)
                want_rank_tokens[c["row"], :experts] += numpy_rank_tokens(chosen, weights,
                                                                          ranks[c["row"], :experts].numpy())
            part = reference.gate_sums(c["logits"], c["indices"], w, c["scoring"], c["top_k"], c["probs"],
                                       c["dropped"], c["capacity_factor"])
            if "ties" in spec:
                part = part._replace(counts=spec["ties"])
            reference.accumulate(*want, c["row"], part)
            x = torch.nan_to_num(c["logits"].float(), nan=0.0, posinf=0.0, neginf=0.0).double()  # [T, E]
            wt = torch.ones(x.shape[0], dtype=torch.float64) if w is None else w.double()  # [T]
            logit_scale[c["row"]] += (x.abs().sum(dim=1) * wt).sum()
            tokens[c["row"]] += wt.sum()
    finally:
        tb._TILE.clear()
        tb._TILE.update(tiles)
    sums, counts, absmax, cosel = (None if on[key] is None else on[key].cpu()
                                   for key in ("sums", "counts", "absmax", "cosel"))
    problems = []
    if placed:
        if not (torch.tril(cosel, -1) == 0).all():
            problems.append("co-selection written below the diagonal")
        got = layout.symmetric(cosel.numpy())
        if not (got == want_cosel).all():
            bad = np.argwhere(got != want_cosel)[:3].tolist()
            problems.append(f"co-selection differs from numpy at {bad}")
        if not (counts[:, layout.RANK_TOKENS].numpy() == want_rank_tokens).all():
            problems.append(f"tokens per rank differ from numpy: {counts[:, layout.RANK_TOKENS, :8].tolist()} "
                            f"vs {want_rank_tokens[:, :8].tolist()}")
        want[1][:, layout.RANK_TOKENS] = counts[:, layout.RANK_TOKENS]  # checked just above
    expected_launches = sum(1 for c in spec["calls"] if c["logits"].shape[0] > 0)
    if counter.launches != expected_launches:
        problems.append(f"{counter.launches} launches for {expected_launches} calls with tokens")
    if not torch.equal(counts, want[1]):
        diff = (counts - want[1]).nonzero().tolist()[:5]
        problems.append(f"counts differ at {diff}: got {[counts[tuple(d)].item() for d in diff]}, "
                        f"want {[want[1][tuple(d)].item() for d in diff]}")
    if not torch.equal(absmax, want[2]):
        problems.append(f"absmax {absmax.tolist()} != {want[2].tolist()}")
    exact = list(EXACT_COLUMNS)
    if not torch.equal(sums[:, exact], want[0][:, exact]):
        problems.append(f"integer columns {sums[:, exact].tolist()} != {want[0][:, exact].tolist()}")
    scale = (want[0] - before).abs()  # [G, C]
    scale[:, layout.LOGIT_SUM] = logit_scale
    bound = RTOL * scale + ATOL_PER_TOKEN * tokens[:, None]  # [G, C]
    err = (sums - want[0]).abs()
    err = torch.where(sums == want[0], 0.0, err)  # equal infinities
    worst = (err / bound.clamp_min(1e-300)).max().item()
    if not worst <= 1.0:
        r, col = divmod(int((err / bound.clamp_min(1e-300)).argmax()), sums.shape[1])
        problems.append(f"sums[{r}, {col}] = {sums[r, col].item()!r}, want {want[0][r, col].item()!r} "
                        f"(bound {bound[r, col].item():.3g})")
    leftover = [n for n, buf in tb._SCRATCH.items() if bool(buf.any())]
    if leftover:
        problems.append(f"scratch not reset: {leftover}")
    return dict(ok=not problems, detail="; ".join(problems), worst=worst, launches=counter.launches,
                grids=[list(gr) for gr in counter.grids])


def child_main(names: List[str]) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the child needs TRITON_INTERPRET=1 before triton loads"
    torch.set_num_threads(1)
    from moewatch.hotpath import triton_backend as tb
    scratch_ptrs, scratch_seen = {}, {}  # the cached buffers must never be replaced
    for name in names:
        start = time.perf_counter()
        try:
            result = run_case(name, tb)
        except Exception as error:  # report and go on with the other cases
            result = dict(ok=False, detail=f"{type(error).__name__}: {error}", worst=None)
        result.update(name=name, seconds=round(time.perf_counter() - start, 2))
        print("CASE " + json.dumps(result), flush=True)
        for key, buf in tb._SCRATCH.items():
            same = scratch_ptrs.setdefault(key, buf.data_ptr()) == buf.data_ptr()
            scratch_seen[key] = scratch_seen.get(key, True) and same
    print("SCRATCH " + json.dumps(dict(widths=sorted(f"{dev}/{e_pad}" for dev, e_pad in tb._SCRATCH),
                                       stable=all(scratch_seen.values()))), flush=True)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted():
    """Run every case once in a child process with TRITON_INTERPRET=1: {name: result}."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            rec = json.loads(line[5:])
            results[rec["name"]] = rec
            print(f"{rec['name']}: {rec['seconds']} s, worst error / bound {rec.get('worst')}")
        elif line.startswith("SCRATCH "):
            results["_scratch"] = json.loads(line[8:])
    print(f"child: {time.perf_counter() - start:.1f} s")
    results["_stderr"] = proc.stderr[-4000:]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(interpreted, name):
    assert name in interpreted, f"the child did not report {name}:\n{interpreted['_stderr']}"
    rec = interpreted[name]
    assert rec["ok"], rec["detail"]


def test_scratch_is_cached_per_device_and_width(interpreted):
    # capacity cases with several programs ran at E_PAD 8 and 64 (random ones may add widths):
    # one buffer per (device, width), allocated once and reused by every later call
    scratch = interpreted.get("_scratch")
    assert scratch is not None, interpreted["_stderr"]
    assert {"cpu/8", "cpu/64"} <= set(scratch["widths"]) and scratch["stable"]


def test_one_launch_per_call_with_the_planned_grid(interpreted):
    # 300 tokens in CUDA's 16-token blocks (E_PAD 64): 19 blocks on the interpreter's 4 programs
    assert interpreted["t300_e60_k6_fp16_topk_right_padded_past_capacity_cuda_tiles"]["grids"] == [[4]]
    assert interpreted["t1_e8_k1_fp32_indices"]["grids"] == [[1]]
    assert interpreted["zero_tokens"]["launches"] == 0


# -- in this process: no kernel runs --

def _load_backend_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("moewatch.hotpath._triton_backend_copy",
                                                  ROOT / "moewatch" / "hotpath" / "triton_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_importable_without_triton(monkeypatch):
    tb = _load_backend_without_triton(monkeypatch)
    assert tb.AVAILABLE is False
    sums, counts, absmax = torch.zeros(1, 17, dtype=torch.float64), torch.zeros(1, 2, 8, dtype=torch.int64), \
        torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="triton"):
        tb.observe(torch.zeros(2, 8), None, None, None, None, None, None, 0, sums, counts, absmax, 0, 2, 0, 0.0)


@pytest.fixture
def stub_backend(monkeypatch):
    """The real module with its kernel replaced by a recorder (no kernel runs)."""
    from moewatch.hotpath import triton_backend as tb
    if not tb.AVAILABLE:
        pytest.skip("triton does not import here")
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(tb, "_kernel", Recorder())
    return tb, launches


def _acc(experts=8):
    return (torch.zeros(2, layout.NUM_SCALARS + experts, dtype=torch.float64),
            torch.zeros(2, 2, experts, dtype=torch.int64), torch.zeros(2, dtype=torch.float64))


def test_zero_tokens_launch_nothing(stub_backend):
    tb, launches = stub_backend
    sums, counts, absmax = _acc()
    tb.observe(torch.zeros(0, 8), None, None, None, None, torch.ones(2, 3), None, 0, sums, counts, absmax, 1, 2, 0, 1.0)
    assert launches == [] and not sums.any() and not counts.any()


def test_host_plan_is_shapes_only(stub_backend):
    tb, launches = stub_backend
    sums, counts, absmax = _acc(60)
    x = torch.zeros(12, 60)
    tb.observe(x, None, None, None, None, torch.ones(4, 5), None, 0, sums, counts, absmax, 1, 6, 1, 1.0)
    tb.observe(x, None, None, None, None, torch.ones(5, 5), None, 0, sums, counts, absmax, 1, 6, 1, 0.0)  # 12 % 5
    (grid, args, kw), (_, args2, kw2) = launches
    assert grid == (1,) and kw["E_PAD"] == 64 and kw["K_SLOTS"] == 6 and kw["SCORING"] == layout.SIGMOID
    assert kw["WEIGHTS"] == 2 and args[-8:-5] == (3, 2, 12)  # S = 3, first column L - S = 2, grid 12
    assert not kw["COSEL"] and not kw["RANKS"]  # placement statistics only when asked for
    assert kw["CAPACITY"] and not kw["SHARED_DROPS"] and kw["CF"] == 1.0
    assert kw2["WEIGHTS"] == 0 and not kw2["CAPACITY"]


def test_rejects_what_the_kernel_cannot_do(stub_backend):
    tb, _ = stub_backend
    sums, counts, absmax = _acc(256)
    with pytest.raises(ValueError, match="experts"):
        tb.observe(torch.zeros(2, 257), None, None, None, None, None, None, 0, sums, counts, absmax, 0, 2, 0, 0.0)
    with pytest.raises(ValueError, match="top-k"):
        tb.observe(torch.zeros(2, 8), torch.zeros(2, 9, dtype=torch.int64), None, None, None, None, None, 0,
                   sums, counts, absmax, 0, 9, 0, 0.0)
    with pytest.raises(ValueError, match="fit"):
        tb.observe(torch.zeros(2, 8), None, None, None, None, None, None, 0, sums, counts, absmax, 5, 2, 0, 0.0)
    with pytest.raises(TypeError):
        tb.observe(torch.zeros(2, 8), None, None, None, None, None, None, 0, sums.float(), counts, absmax, 0, 2, 0,
                   0.0)


if __name__ == "__main__" and "--child" in sys.argv:
    child_main(sys.argv[sys.argv.index("--child") + 1:] or list(CASES))
