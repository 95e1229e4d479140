"""Forwards on several threads at once: counts stay exact and padding masks do not mix."""
import threading

import numpy as np
import torch

import moewatch
from tests.conftest import padded_batch, tiny_mixtral


def test_eight_threads_count_exactly():
    model = tiny_mixtral()
    batches = [padded_batch(seed=s, batch=2 + s % 3, length=6 + s) for s in range(8)]
    expected = {}
    with moewatch.attach(model, background=False) as mon:  # one batch at a time, for the answer
        for ids, mask in batches:
            with torch.no_grad():
                model(ids, attention_mask=mask)
        single = mon.counts()
    repeats = 5
    expected = {k: v * repeats for k, v in single.items()}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the threads themselves are the concurrency
    try:
        mon = moewatch.attach(model)  # with the reader thread snapshotting meanwhile
        errors = []

        def worker(ids, mask):
            try:
                for _ in range(repeats):
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
        got = mon.counts()
        frame = mon.windows()
        mon.detach()
    finally:
        torch.set_num_threads(previous_threads)
    assert errors == []
    assert mon.error_counts() == {}
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    total_tokens = repeats * sum(int(m.sum()) for _, m in batches)
    assert frame.groupby("gate")["tokens"].sum().tolist() == [total_tokens, total_tokens]
