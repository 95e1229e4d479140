"""Windows are cut at forward ends only: never between two gates of one forward.

With forwards on four threads and windows closing all the time, every (window, gate) row of a
window holds the same tokens for every gate; with ``window_seconds`` out of the way the same
traffic gives the same windows on every run, on both hot-path backends (the device one runs its
torch reference here, as on a GPU without Triton).
"""
import threading

import numpy as np
import pytest
import torch

import moewatch
from tests.conftest import padded_batch, tiny_mixtral
from tests.moe_from_scratch import TinyMoELM


def _tokens_by_window(mon) -> np.ndarray:
    """[windows, gates] tokens, rows in window order."""
    frame = mon.windows()
    return frame.pivot(index="window", columns="gate", values="tokens").to_numpy()


@pytest.mark.parametrize("backend", ["staged"])
def test_four_threads_with_windows_closing_continuously_never_split_a_forward(backend, one_thread):
    """CPU gates (the staged backend). The device backend cuts at forward ends of one stream: with
    several threads driving one device at once, a cut may fall inside another thread's forward
    (docs/performance.md, limits)."""
    model = tiny_mixtral(layers=4)
    batches = [padded_batch(seed=s, batch=1 + s % 3, length=5 + 3 * s) for s in range(4)]
    # a window of a few tokens closes after almost every forward; the reader polls every few ms
    mon = moewatch.attach(model, backend=backend, window_tokens=7, window_seconds=0.01, ring_windows=100_000)
    errors = []

    def worker(ids, mask):
        try:
            for _ in range(30):
                with torch.no_grad():
                    model(ids, attention_mask=mask)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.flush()
    tokens = _tokens_by_window(mon)
    real = sum(int(mask.sum()) for _, mask in batches) * 30
    mon.detach()
    assert not errors and mon.error_counts() == {}
    assert len(tokens) > 50  # windows really closed while forwards ran
    assert (tokens == tokens[:, :1]).all(), "a window split a forward: gates disagree on tokens"
    assert tokens[:, 0].sum() == real


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_the_same_traffic_gives_the_same_windows(backend, one_thread):
    model = tiny_mixtral(layers=2)
    runs = []
    for _ in range(2):
        mon = moewatch.attach(model, backend=backend, window_tokens=40, window_seconds=3600)
        for seed in range(12):
            ids, mask = padded_batch(seed=seed, batch=2, length=4 + seed)
            with torch.no_grad():
                model(ids, attention_mask=mask)
            if seed % 5 == 0:
                mon.counts()  # the reader may drain at any moment: it must not move a cut
        mon.flush()
        frame = mon.windows()
        runs.append(frame[["window", "gate", "tokens", "assignments"]].to_numpy().tolist())
        mon.detach()
    assert runs[0] == runs[1]
    tokens = [row[2] for row in runs[0][::2]]
    # each window closes at the first forward end at or past 40 tokens (the last one by flush)
    assert all(t >= 40 for t in tokens[:-1]) and len(tokens) >= 3


def test_a_gate_called_outside_a_monitored_forward_counts_as_a_forward_of_its_own(one_thread):
    """The router called directly (no root forward around it): every call is its own boundary."""
    torch.manual_seed(0)
    model = TinyMoELM(vocab=64)
    mon = moewatch.attach(model, gates="blocks.*.router", top_k=2, background=False, window_tokens=10)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        for _ in range(6):
            model.blocks[0].router(x)
    mon.flush()
    frame = mon.windows()
    mon.detach()
    gate0 = frame[frame["gate"] == "blocks.0.router"]["tokens"].tolist()
    assert gate0 == [12, 12]


def test_a_compiled_model_on_four_threads_counts_exactly_and_never_splits_a_forward(one_thread):
    """fullgraph-compiled forwards on four threads, each with its own padding: the masks reach
    each thread's gate ops, counts are exact, and no window splits a forward."""
    model = tiny_mixtral(layers=3)
    batches = [padded_batch(seed=s, batch=2, length=6 + s) for s in range(4)]
    mon = moewatch.attach(model, window_tokens=9, window_seconds=0.01, ring_windows=100_000)
    single = []
    for ids, mask in batches:  # eager, one at a time: the expected counts
        before = mon.counts()
        with torch.no_grad():
            model(ids, attention_mask=mask)
        single.append({k: v - before[k] for k, v in mon.counts().items()})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for ids, mask in batches:  # compile every shape before the threads race
            compiled(ids, attention_mask=mask)
    start = mon.counts()
    errors = []

    def worker(ids, mask):
        try:
            for _ in range(10):
                with torch.no_grad():
                    compiled(ids, attention_mask=mask)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.flush()
    got = {k: v - start[k] for k, v in mon.counts().items()}
    tokens = _tokens_by_window(mon)
    mon.detach()
    torch._dynamo.reset()
    assert not errors and mon.error_counts() == {}
    for name in got:
        np.testing.assert_array_equal(got[name], 10 * sum(s[name] for s in single))
    assert (tokens == tokens[:, :1]).all()
