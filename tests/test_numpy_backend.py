"""The CPU reader's numpy reduction against the readable torch reference (its oracle).

``numpy_backend.gate_sums`` must return what ``reference.gate_sums`` returns for the same call:
random shapes (T = 0, 1, 7, 64, 8191; E in {1, 8, 60, 64, 128, 256}; k up to 8), NaN/+-Inf
logits and whole non-finite rows, fp16/bf16/fp32 inputs, non-contiguous tensors, padding
weights (0/1 and fractional), sigmoid scoring, router-given probabilities (with NaN), the
router's own indices (repeated ids included) or the top-k, native drops, would-be drops over
several calls, placements and co-selection.

Tolerances. Counts, drops, co-selection, tokens per rank, absmax and the integer-valued columns
(tokens, finite and non-finite logit counts) must be EQUAL. Other float sums: |got - want| <=
1e-5 * scale + 1e-6 * tokens, scale = |want| (per-token values of those columns are >= 0) or,
for the logit sum, whose terms cancel, the weighted sum of |finite logit|. Why: both do the same
float32 per-token math on the same upcast inputs, with numpy's and torch's exp/log (an ulp or
two apart) and different summation orders over experts (~1e-7 relative), then float64 sums.

Every test runs twice: with the compiled kernel (``numba_backend``, which takes softmax scoring
with the router's own ids: most cases here) and with numpy alone. The compiled run fails where
numba, a test dependency, cannot compile the kernel, rather than quietly testing numpy twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moewatch.hotpath import layout, numba_backend, numpy_backend, reference

RTOL, ATOL_PER_TOKEN = 1e-5, 1e-6


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def kernel(request, monkeypatch):
    """Each test with the compiled kernel, then with numpy alone."""
    monkeypatch.setattr(numba_backend, "enabled", request.param == "compiled")
    if request.param == "compiled":
        assert numba_backend.available(), "numba could not compile the reader's kernel"
    return request.param
EXACT_COLUMNS = (layout.TOKENS, layout.LOGIT_FINITE, layout.NONFINITE)


def _logits(g, tokens, experts, dtype, nonfinite=0.0, nan_rows=0, scale=1.0, transposed=False):
    x = (torch.randn(tokens, experts, generator=g) * scale).clamp(-30, 30)  # [T, E]
    if nonfinite:
        bad = torch.rand(tokens, experts, generator=g) < nonfinite
        kind = torch.randint(0, 3, (tokens, experts), generator=g)
        x = torch.where(bad, torch.tensor([math.nan, math.inf, -math.inf])[kind], x)
    if nan_rows and tokens:
        x[torch.randperm(tokens, generator=g)[:nan_rows]] = math.nan
        x[0, : max(1, experts // 2)] = math.inf  # a row mixing +Inf and NaN
    x = x.to(dtype)
    if transposed:  # strides (1, T)
        out = torch.empty(experts, tokens, dtype=dtype).t()
        out.copy_(x)
        return out
    return x


def _indices(g, tokens, experts, k, repeats=False):
    if repeats:  # ids may repeat within a token (a set of experts counts each once)
        return torch.randint(0, experts, (tokens, k), generator=g)
    return torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :k]  # [T, k] distinct


def _case(seed: int, tokens: int, experts: int, k: int, dtype, *, scoring=layout.SOFTMAX, given=True,
          probs=False, valid=None, dropped=False, capacity=0.0, calls=1, placement=False, nonfinite=0.0,
          nan_rows=0, repeats=False, transposed=False, scale=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    args = dict(
        logits=_logits(g, tokens, experts, dtype, nonfinite, nan_rows, scale, transposed),
        indices=_indices(g, tokens, experts, k, repeats) if given else None,
        valid=None, scoring=scoring, top_k=k, probs=None, dropped=None, capacity_factor=capacity,
        call_ids=None, num_calls=calls, ranks=None, coselect=True)
    if probs:
        p = torch.softmax(torch.randn(tokens, experts, generator=g), dim=-1)
        if tokens:
            p[0, 0] = math.nan
        args["probs"] = p
    if valid == "binary":
        args["valid"] = (torch.rand(tokens, generator=g) < 0.7).float()
    elif valid == "fractional":
        args["valid"] = torch.rand(tokens, generator=g) * (torch.rand(tokens, generator=g) < 0.8)
    if dropped:
        args["dropped"] = torch.rand(tokens, k, generator=g) < 0.3
    if calls > 1:
        args["call_ids"] = torch.sort(torch.randint(0, calls, (tokens,), generator=g)).values
    if placement:
        args["ranks"] = torch.randint(0, max(1, experts // 4), (experts,), generator=g)
    return args


CASES = {
    "t0_e8": dict(seed=1, tokens=0, experts=8, k=2, dtype=torch.float32, capacity=1.0),
    "t1_e8_k1": dict(seed=2, tokens=1, experts=8, k=1, dtype=torch.float32),
    "t7_e60_k6_bf16_sigmoid_topk_nonfinite": dict(seed=3, tokens=7, experts=60, k=6, dtype=torch.bfloat16,
                                                  scoring=layout.SIGMOID, given=False, nonfinite=0.1),
    "t8191_e8_k2_fp16_binary_valid_capacity_nan_rows": dict(
        seed=4, tokens=8191, experts=8, k=2, dtype=torch.float16, valid="binary", capacity=1.0,
        nonfinite=0.01, nan_rows=3),
    "t8191_e64_k4_sigmoid_topk_fractional_valid_capacity_calls": dict(
        seed=5, tokens=8191, experts=64, k=4, dtype=torch.float32, scoring=layout.SIGMOID, given=False,
        valid="fractional", capacity=1.25, calls=7, nonfinite=0.002),
    "t50_e128_k4_bf16_router_probs_native_drops": dict(
        seed=6, tokens=50, experts=128, k=4, dtype=torch.bfloat16, probs=True, dropped=True, valid="binary",
        nonfinite=0.02),
    "t33_e256_k8_topk_capacity_placement": dict(seed=7, tokens=33, experts=256, k=8, dtype=torch.float32,
                                                given=False, capacity=2.0, placement=True),
    "t64_e60_k6_fp16_repeated_ids_placement_transposed": dict(
        seed=8, tokens=64, experts=60, k=6, dtype=torch.float16, repeats=True, placement=True, transposed=True,
        nonfinite=0.05),
    "t200_e128_k2_peaked": dict(seed=9, tokens=200, experts=128, k=2, dtype=torch.float32, scale=25.0),
    "t7_e1_k1_sigmoid": dict(seed=10, tokens=7, experts=1, k=1, dtype=torch.float32, scoring=layout.SIGMOID),
    "t64_e8_k8_all_experts": dict(seed=11, tokens=64, experts=8, k=8, dtype=torch.bfloat16, given=False,
                                  capacity=0.1, calls=3),
    "t8191_e256_k8_router_probs_topk_placement": dict(
        seed=12, tokens=8191, experts=256, k=8, dtype=torch.float32, given=False, probs=True, placement=True,
        valid="binary"),
}
for i in range(24):  # a sweep of random combinations
    rng = np.random.default_rng(100 + i)
    experts = int(rng.choice([8, 60, 64, 128, 256]))
    CASES[f"random_{i}"] = dict(
        seed=100 + i, tokens=int(rng.choice([1, 7, 64, 500])), experts=experts,
        k=int(rng.choice([1, 2, 4, 6, 8])), dtype=[torch.float32, torch.float16, torch.bfloat16][i % 3],
        scoring=int(rng.integers(2)), given=bool(rng.integers(2)), probs=bool(rng.integers(2)),
        valid=[None, "binary", "fractional"][int(rng.integers(3))], dropped=bool(rng.integers(2)),
        capacity=float(rng.choice([0.0, 0.75, 1.5])), calls=int(rng.choice([1, 4])),
        placement=bool(rng.integers(2)), nonfinite=float(rng.choice([0.0, 0.05])), repeats=bool(rng.integers(2)),
        transposed=bool(rng.integers(2)))


def _check(got: reference.GateSums, want: reference.GateSums, args: dict) -> None:
    for name in ("counts", "drops", "cosel", "rank_tokens"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == torch.int64, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got.absmax, want.absmax, rtol=0, atol=0)
    tokens = float(want.scalars[layout.TOKENS])
    logits = args["logits"].float()
    finite = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).abs()
    weight = torch.ones(logits.shape[0]) if args["valid"] is None else args["valid"].float()
    for column in range(layout.NUM_SCALARS):
        a, b = float(got.scalars[column]), float(want.scalars[column])
        if column in EXACT_COLUMNS:
            assert a == b, layout.SCALAR_NAMES[column]
            continue
        scale = float((finite.sum(dim=1) * weight).sum()) if column == layout.LOGIT_SUM else abs(b)
        assert abs(a - b) <= RTOL * scale + ATOL_PER_TOKEN * tokens, (layout.SCALAR_NAMES[column], a, b)
    bound = RTOL * want.prob_sum.abs() + ATOL_PER_TOKEN * tokens
    assert bool(((got.prob_sum - want.prob_sum).abs() <= bound).all()), (got.prob_sum, want.prob_sum)


@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_reduction_equals_the_reference(name):
    spec = dict(CASES[name])
    args = _case(spec.pop("seed"), spec.pop("tokens"), spec.pop("experts"), spec.pop("k"), spec.pop("dtype"),
                 **spec)
    want = reference.gate_sums(**args)
    got = numpy_backend.gate_sums(**args)
    _check(got, want, args)
    # the reader passes numpy arrays (its concatenation of many calls): the same sums
    arrays = {key: numpy_backend.as_array(value, np.int64 if key in ("indices", "call_ids", "dropped")
                                          else np.float64 if key == "valid" else np.float32)
              if isinstance(value, torch.Tensor) and key != "ranks" else value for key, value in args.items()}
    _check(numpy_backend.gate_sums(**arrays), want, args)
    # and as the reader lays them out: the logits expert-major [E, T], from its concatenation
    if args["logits"].shape[0]:
        (part,) = numpy_backend.segment_sums(**dict(arrays, logits=numpy_backend.concat_experts([args["logits"]])),
                                             expert_major=True)
        _check(reference.GateSums(*[None if v is None else torch.from_numpy(np.asarray(v)) for v in part]),
               want, args)


@pytest.mark.parametrize("blocks", ["as set", "short"])
@pytest.mark.parametrize("experts", [8, 31, 32, 128])
def test_concat_experts_lays_many_calls_out_expert_major(experts, blocks, monkeypatch):
    """The reader's join of many calls' logits: arena copies (numpy, fp32/fp16), tensors (bf16,
    3-D, requiring grad) and a mix of both give the calls' rows one after the other as one
    C-contiguous float32 [E, sum T], narrow or wide, in blocks of any length ("short": 7 tokens,
    so blocks split calls); no token at all gives [E, 0]; calls of another width raise, as
    torch.cat does (the caller then reduces gate by gate)."""
    if blocks == "short":
        monkeypatch.setattr(numpy_backend, "WIDE_BLOCK_TOKENS", 7)
        monkeypatch.setattr(numpy_backend, "NARROW_BLOCK_TOKENS", 7)
    generator = torch.Generator().manual_seed(experts)
    calls = [torch.randn(tokens, experts, generator=generator) for tokens in (300, 1, 257, 0, 40)]
    want = torch.cat(calls).numpy().T  # [E, sum T]
    arrays = [call.numpy() for call in calls]
    half = [call.numpy().astype(np.float16) for call in calls]
    tensors = [calls[0].to(torch.bfloat16), calls[1].reshape(1, 1, experts), calls[2].requires_grad_(),
               calls[3], calls[4]]
    mixed = [arrays[0], calls[1], arrays[2], calls[3], arrays[4]]
    # each set of members and how many leading columns came in half precision (bf16, fp16)
    for members, rounded in ((arrays, 0), (half, want.shape[1]), (tensors, 300), (mixed, 0)):
        got = numpy_backend.concat_experts(members)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == want.shape
        np.testing.assert_array_equal(got[:, rounded:], want[:, rounded:])
        np.testing.assert_allclose(got[:, :rounded], want[:, :rounded], rtol=1e-2, atol=1e-2)
    for empty in ([arrays[3]], [calls[3], calls[3]]):
        assert numpy_backend.concat_experts(empty).shape == (experts, 0)
    with pytest.raises((ValueError, RuntimeError)):
        numpy_backend.concat_experts([arrays[0], np.zeros((3, experts + 1), dtype=np.float32)])
    with pytest.raises((ValueError, RuntimeError)):
        numpy_backend.concat_experts([calls[0], torch.zeros(3, experts + 1)])


def test_exact_ties_break_as_the_reference_breaks_them():
    """No indices: the top-k of tied probabilities is the reference's own choice among equals."""
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0, 3.0, 0.0, 0.0, 0.0],
                      [1.0] * 8,
                      [math.nan, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 1.0, 4.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    args = dict(logits=x, indices=None, valid=None, scoring=layout.SOFTMAX, top_k=2, coselect=True)
    want, got = reference.gate_sums(**args), numpy_backend.gate_sums(**args)
    _check(got, want, dict(args, valid=None))
    assert float(got.scalars[layout.MARGIN]) == pytest.approx(float(want.scalars[layout.MARGIN]), abs=1e-6)


def test_expert_ids_out_of_range_or_of_another_shape_raise():
    """A router id outside [0, E), or ids that do not pair with the logits' tokens, are an error
    (the reader counts the call as failed), not a count; the reference raises on both too."""
    x = torch.randn(4, 8)
    for bad in (8, -1):
        ids = torch.tensor([[0, 1], [2, bad], [3, 4], [5, 6]])
        with pytest.raises(IndexError, match=r"\[0, 8\)"):
            numpy_backend.gate_sums(x, ids, None, layout.SOFTMAX, 2)
    for ids in (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="expert ids of shape"):
            numpy_backend.gate_sums(x, ids, None, layout.SOFTMAX, 2)
        with pytest.raises(RuntimeError):
            reference.gate_sums(x, ids, None, layout.SOFTMAX, 2)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("pieces", ["one", "many", "sliced", "many sliced"])
def test_segments_equal_each_gate_reduced_alone(seed, pieces, monkeypatch):
    """Several gates' calls in one pass (the reader's merged reduction): each segment's sums
    equal the reference's sums of that segment alone; empty segments add nothing. "many": the
    tokens are reduced in pieces of 8-16 tokens, so pieces cut segments and segments share pieces.
    "sliced": a piece's segments are summed slice by slice (as long segments are), not by one
    reduceat."""
    if "sliced" in pieces:
        monkeypatch.setattr(numpy_backend, "SLICED_SEGMENT_TOKENS", 1)
    if "many" in pieces:
        monkeypatch.setattr(numpy_backend, "PIECE_VALUES", 128)
        monkeypatch.setattr(numpy_backend, "MIN_PIECE_TOKENS", 8)
    g = torch.Generator().manual_seed(500 + seed)
    experts, k = [8, 64, 128, 60][seed % 4], [2, 4, 1, 6][seed % 4]
    sizes = [int(n) for n in torch.randint(0, 40, (5,), generator=g)]
    sizes[seed % 5] = 0  # an empty segment, anywhere
    given, capacity = seed % 2 == 0, [0.0, 1.0, 1.5][seed % 3]
    valid_kind, probs, dropped = [None, "binary", "fractional"][seed % 3], seed % 4 == 1, seed % 4 == 2
    parts = [_case(900 + seed * 10 + i, n, experts, k, [torch.float32, torch.bfloat16][seed % 2],
                   scoring=seed % 2, given=given, probs=probs, valid=valid_kind, dropped=dropped,
                   capacity=capacity, nonfinite=0.05 if seed % 3 == 0 else 0.0)
             for i, n in enumerate(sizes)]
    for part in parts:  # each segment's own calls (2 per segment at most), numbered across segments
        part["call_ids"] = (torch.arange(part["logits"].shape[0]) * 2 // max(1, part["logits"].shape[0])).long()
    offsets = np.cumsum([0] + [2] * (len(parts) - 1))
    joined = {}
    for key in ("logits", "indices", "valid", "probs", "dropped"):
        column = [part[key] for part in parts]
        joined[key] = None if column[0] is None else torch.cat([t.float() if key == "logits" else t
                                                                for t in column])
    calls = torch.cat([part["call_ids"] + int(offset) for part, offset in zip(parts, offsets)])
    starts = np.cumsum([0] + sizes[:-1])
    got = numpy_backend.segment_sums(joined["logits"], joined["indices"], joined["valid"], seed % 2, k,
                                     joined["probs"], joined["dropped"], capacity, calls, 2 * len(parts),
                                     coselect=True, starts=starts)
    assert len(got) == len(parts)
    for part, segment in zip(parts, got):
        want = reference.gate_sums(**dict(part, num_calls=2))
        _check(reference.GateSums(*[None if v is None else torch.from_numpy(np.asarray(v)) for v in segment]),
               want, part)


@pytest.mark.parametrize("scoring", [layout.SOFTMAX, layout.SIGMOID])
@pytest.mark.parametrize("experts, k, repeats", [(8, 2, False), (64, 8, False), (60, 6, True), (1, 1, False)])
def test_the_common_case_runs_the_compiled_kernel_across_blocks(experts, k, repeats, scoring, kernel, monkeypatch):
    """Softmax or sigmoid scoring with the router's own ids (every MoE the hooks know but those
    that give their own probabilities) is reduced by the compiled kernel when it is on, by numpy
    when it is off, to the reference's sums: segments that start and end inside the kernel's
    blocks of 64 tokens (sizes 0, 63, 64, 65, 130, 1), padding, non-finite logits and whole NaN
    rows, logits far out (sigmoid's exp(-x) at its clamps), ids repeated within a token."""
    ran = []
    compiled_sums = numba_backend.segment_sums
    monkeypatch.setattr(numba_backend, "segment_sums", lambda *a: ran.append(1) or compiled_sums(*a))
    sizes = [0, 63, 64, 65, 130, 1]
    parts = [_case(700 + i, n, experts, k, torch.float32, scoring=scoring, valid="binary" if i % 2 else None,
                   nonfinite=0.05, nan_rows=1 if n > 1 else 0, repeats=repeats, scale=[1.0, 30.0][i % 2])
             for i, n in enumerate(sizes)]
    for part in parts:
        if part["valid"] is None:  # each segment with weights, some all ones
            part["valid"] = torch.ones(part["logits"].shape[0])
        if part["logits"].shape[0] > 2:  # beyond the exps' clamps (-87, 88)
            part["logits"][2, 0], part["logits"][2, -1] = 100.0, -100.0
    joined = {key: torch.cat([part[key] for part in parts]) for key in ("logits", "indices", "valid")}
    starts = np.cumsum([0] + sizes[:-1])
    got = numpy_backend.segment_sums(numpy_backend.concat_experts([joined["logits"]]), joined["indices"],
                                     joined["valid"], scoring, k, coselect=True, starts=starts,
                                     expert_major=True)
    assert len(ran) == (1 if kernel == "compiled" else 0)
    for part, segment in zip(parts, got):
        want = reference.gate_sums(**part)
        _check(reference.GateSums(*[None if v is None else torch.from_numpy(np.asarray(v)) for v in segment]),
               want, part)



@pytest.mark.skipif(not numba_backend.available(), reason="numba is not installed")
def test_every_loaded_modules_objects_can_be_scanned_once_the_kernel_is_compiled():
    """A scan of every loaded module's objects and their ``__dict__`` (what vLLM runs at each
    engine's start-up) gets a dict from each, llvmlite's library object included."""
    import sys

    from llvmlite.binding import ffi

    assert isinstance(vars(ffi.lib), dict)
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")  # raised AttributeError on llvmlite's before
