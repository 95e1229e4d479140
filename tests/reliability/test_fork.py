"""Forks while forwards run on another thread: no child hangs on a lock the parent held.

Each child runs a monitored forward, reads its counts, closes a window and exits. Children that
hang are killed after a deadline and fail the test. ``multiprocessing`` with ``fork`` and
DataLoader workers (fork context) run monitored forwards too.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

import moewatch
from conftest import padded_batch, tiny_mixtral

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _child_work(model, mon) -> int:
    """Exit status: 0 when the child's monitor counted its own forward and closed a window."""
    ids, mask = padded_batch(seed=5, batch=2, length=6)
    before = sum(int(c.sum()) for c in mon.counts().values())
    with torch.no_grad():
        model(ids, attention_mask=mask)
    after = sum(int(c.sum()) for c in mon.counts().values())
    mon.flush()
    expected = int(mask.sum()) * 2 * len(mon.gates)  # top-2 assignments of real tokens, every gate
    return 0 if after - before == expected else 3


def test_a_hundred_forks_under_load_never_hang(one_thread):
    model = tiny_mixtral(layers=2)
    mon = moewatch.attach(model, window_tokens=16, window_seconds=0.005)  # the reader is busy too
    stop = threading.Event()

    def load():
        ids, mask = padded_batch(seed=1, batch=3, length=9)
        while not stop.is_set():
            with torch.no_grad():
                model(ids, attention_mask=mask)
            mon.error_counts()  # the error log's lock, taken all the time

    worker = threading.Thread(target=load)
    worker.start()
    statuses, hung = [], 0
    try:
        for _ in range(100):
            pid = os.fork()
            if pid == 0:  # the child
                code = 1
                try:
                    code = _child_work(model, mon)
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        worker.join()
        mon.detach()
    assert hung == 0
    assert statuses == [0] * 100


def _pool_forward(seed: int) -> int:
    model, mon = _POOL_STATE
    ids, mask = padded_batch(seed=seed, batch=2, length=5)
    before = sum(int(c.sum()) for c in mon.counts().values())
    with torch.no_grad():
        model(ids, attention_mask=mask)
    return sum(int(c.sum()) for c in mon.counts().values()) - before


_POOL_STATE = None


def test_multiprocessing_fork_pool_workers_count_their_own_forwards(one_thread):
    global _POOL_STATE
    model = tiny_mixtral(layers=2)
    mon = moewatch.attach(model, window_tokens=8, window_seconds=0.01)
    _POOL_STATE = (model, mon)
    stop = threading.Event()

    def load():
        ids, mask = padded_batch(seed=2, batch=2, length=7)
        while not stop.is_set():
            with torch.no_grad():
                model(ids, attention_mask=mask)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            added = pool.map_async(_pool_forward, range(8)).get(timeout=120)
    finally:
        stop.set()
        worker.join()
        mon.detach()
        _POOL_STATE = None
    expected = [int(padded_batch(seed=s, batch=2, length=5)[1].sum()) * 2 * 2 for s in range(8)]
    assert added == expected


class _ForwardingDataset(torch.utils.data.Dataset):
    """A dataset whose items run a monitored forward (as augmentation-by-model pipelines do)."""

    def __init__(self, model, mon):
        self.model, self.mon = model, mon

    def __len__(self):
        return 6

    def __getitem__(self, index):
        ids, mask = padded_batch(seed=index, batch=1, length=4)
        before = sum(int(c.sum()) for c in self.mon.counts().values())
        with torch.no_grad():
            self.model(ids, attention_mask=mask)
        return sum(int(c.sum()) for c in self.mon.counts().values()) - before


def test_dataloader_fork_workers_run_monitored_forwards(one_thread):
    model = tiny_mixtral(layers=2)
    mon = moewatch.attach(model, window_tokens=8, window_seconds=0.01)
    try:
        loader = torch.utils.data.DataLoader(_ForwardingDataset(model, mon), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork", timeout=120)
        added = list(loader)
    finally:
        mon.detach()
    assert added == [int(padded_batch(seed=i, batch=1, length=4)[1].sum()) * 2 * 2 for i in range(6)]
