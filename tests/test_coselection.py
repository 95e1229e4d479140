"""Co-selection and tokens per rank, exact: the hot path against a numpy reference from the same indices.

The reference (the oracle of every backend) against tests/coselection_numpy.py on random shapes,
padding and k up to 8 (duplicate ids included); the CPU staged backend and the device backend's
torch fallback end to end through ``attach`` on a model whose gate picks known experts; the
snapshots kept for postmortems within their bound. The Triton kernel is checked against the same
numpy reference under TRITON_INTERPRET=1 in tests/test_triton_kernel.py.
"""
import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from moewatch.hotpath import layout, reference
from moewatch.placement.history import CoselectionHistory, cadence
from tests.coselection_numpy import numpy_coselection, numpy_rank_tokens


@pytest.mark.parametrize("seed", range(12))
def test_reference_equals_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    tokens, experts = pick([0, 1, 7, 100, 513]), pick([1, 2, 8, 60, 256])
    k = pick([s for s in (1, 2, 3, 6, 8) if s <= experts])
    indices = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :k]  # [T, k] distinct
    if seed % 3 == 0 and k > 1 and tokens:  # a router naming one expert twice: it counts once
        indices[: tokens // 2, -1] = indices[: tokens // 2, 0]
    weight = (torch.rand(tokens, generator=g) < 0.7).to(torch.int64)  # [T] padding excluded
    ranks = torch.randint(0, pick([1, 2, max(1, experts // 4), experts]), (experts,), generator=g)
    upper = reference.coselection(indices, weight, experts).numpy()
    assert (np.tril(upper, -1) == 0).all()
    np.testing.assert_array_equal(layout.symmetric(upper), numpy_coselection(indices.numpy(), weight.numpy(), experts))
    np.testing.assert_array_equal(reference.rank_tokens(indices, weight, ranks).numpy(),
                                  numpy_rank_tokens(indices.numpy(), weight.numpy(), ranks.numpy()))


class KnownRouter(nn.Module):
    """A root model whose gate (``router``) routes [B, L] tokens; padding comes as attention_mask."""

    def __init__(self, experts: int, hidden: int = 16):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)

    def forward(self, x, attention_mask=None):
        return self.router(x.reshape(-1, x.shape[-1]))  # [B*L, E]


def _chosen(model, x, k):
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), model.router.weight)  # not the hooked call
        return torch.topk(torch.softmax(logits, dim=-1), k).indices.numpy()


@pytest.mark.parametrize("backend, experts, k", [("staged", 8, 2), ("staged", 60, 8), ("device", 16, 4)])
def test_monitor_coselection_and_rank_tokens_equal_numpy(backend, experts, k):
    torch.manual_seed(experts + k)
    model = KnownRouter(experts)
    ranks = np.random.default_rng(k).integers(0, 4, experts)
    mon = moewatch.attach(model, gates="router", top_k=k, background=False, backend=backend,
                          expert_placement=ranks.tolist(), rank=1)
    want = np.zeros((experts, experts), dtype=np.int64)
    reach = np.zeros(experts, dtype=np.int64)
    windows = []
    for step in range(3):
        x = torch.randn(3, 5 + step, 16)
        mask = torch.ones(3, 5 + step, dtype=torch.int64)
        mask[0, :2] = 0  # left padding
        mask[2, -1] = 0
        model(x, attention_mask=mask)
        windows.append(mon.flush())
        chosen, weights = _chosen(model, x, k), mask.reshape(-1).numpy()
        want += numpy_coselection(chosen, weights, experts)
        reach += numpy_rank_tokens(chosen, weights, ranks)
    np.testing.assert_array_equal(mon.coselection()["router"], want)
    frame = mon.expert_parallel()
    assert len(frame) == 3 and (frame["ep_ranks"] == ranks.max() + 1).all()
    # all-to-all sends: every rank a token reaches but its home (rank=1)
    assert frame["alltoall_sends"].sum() == reach.sum() - reach[1]
    counts = mon.counts()["router"]
    loads = np.bincount(ranks, weights=counts, minlength=ranks.max() + 1)
    last = frame.iloc[-1]
    assert np.isclose(np.sum(last["ep_rank_share"]), 1.0)
    assert 1.0 <= frame["ep_load_imbalance"].min() and np.isfinite(loads).all()
    spans = mon.coselection_spans()
    assert sum(np.asarray(c).reshape(experts, experts) for c in spans["coselection"]).tolist() == want.tolist()
    mon.detach()
    assert mon.error_counts() == {}


def test_placement_changes_no_statistic_and_no_output():
    torch.manual_seed(3)
    model = KnownRouter(8)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :3] = 0
    frames, outputs = [], []
    for placement in (None, "contiguous:2"):
        with moewatch.attach(model, gates="router", top_k=2, background=False, expert_placement=placement) as mon:
            outputs.append(model(x, attention_mask=mask))
            mon.flush()
            frames.append(mon.windows().drop(columns=["t_start", "t_end"]))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], model(x, attention_mask=mask))
    assert frames[0].to_json() == frames[1].to_json()


def test_snapshots_are_coarser_than_windows_and_bounded():
    assert cadence(8) == 2 and cadence(256) == 64 and cadence(2) == 1
    history = CoselectionHistory(num_gates=3, max_experts=256, ring_windows=1024)
    assert history.spans.maxlen == 17
    total = np.zeros((3, 256, 256), dtype=np.int64)
    for window in range(2000):
        total[:, 0, 1] += 1
        history.on_window(window)
        history.collect(lambda: total.copy())
    assert len(history.spans) == 17  # the oldest dropped: memory stays bounded
    assert all(s.last - s.first + 1 == 64 for s in history.spans)
    # bound: kept co-selection bytes <= the ring's per-expert columns (4 x E values a window) + one span
    kept = sum(s.counts.nbytes for s in history.spans)
    assert kept <= 1024 * 3 * 4 * 256 * 8 + history.spans[0].counts.nbytes
