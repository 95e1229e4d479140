"""Forwards on several threads at once: counts stay exact and padding masks do not mix."""
import threading

import numpy as np
import pytest
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


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_forward_under_way_at_attach_is_counted_at_none_of_its_gates(grad, backend):
    """A model serving on one thread, attached from another while a forward is half-way (held
    before its third layer, so its first two gates ran unwatched): that forward counts at no
    gate, the ones after it at every gate. Its later gates had counted it before."""
    model = tiny_mixtral(layers=4)
    in_flight, attached = threading.Event(), threading.Event()

    def hold_first_forward(module, args):
        if not attached.is_set():
            in_flight.set()
            attached.wait(30)

    model.model.layers[2].register_forward_pre_hook(hold_first_forward)
    ids = torch.randint(0, 128, (2, 16))

    def serve():
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                model(ids)

    server = threading.Thread(target=serve)
    server.start()
    assert in_flight.wait(30)
    mon = moewatch.attach(model, background=False, backend=backend)
    attached.set()
    server.join(30)
    mon.flush()
    assert mon.error_counts() == {}
    assert [int(c.sum()) for c in mon.counts().values()] == [2 * 32 * 2] * 4  # 2 forwards x 32 tokens x top-2
    windows = mon.windows()
    assert windows.groupby("window")["tokens"].nunique().eq(1).all()
    mon.detach()


def test_a_forward_under_way_at_detach_is_counted_at_none_of_its_gates():
    """The mirror of the above: a model serving on one thread, detached from another while a
    forward is half-way (its first two gates ran watched, its last two will run unwatched). The
    monitor's last window holds the whole forwards before it, at every gate, and that forward
    at none (CPU backend; docs/hotpath.md says what the device backend does)."""
    model = tiny_mixtral(layers=4)
    in_flight, detached = threading.Event(), threading.Event()
    forwards = []

    def hold_second_forward(module, args):
        forwards.append(1)
        if len(forwards) == 2:
            in_flight.set()
            detached.wait(30)

    model.model.layers[2].register_forward_pre_hook(hold_second_forward)
    ids = torch.randint(0, 128, (2, 16))
    errors = []

    def serve():
        try:
            with torch.no_grad():
                for _ in range(3):
                    model(ids)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    mon = moewatch.attach(model, background=False)
    server = threading.Thread(target=serve)
    server.start()
    assert in_flight.wait(30)
    mon.detach()
    detached.set()
    server.join(30)
    assert errors == [] and len(forwards) == 3  # the model served on, unwatched
    assert mon.error_counts() == {}
    assert [int(c.sum()) for c in mon.counts().values()] == [32 * 2] * 4  # the first forward, at every gate
    assert mon.windows().groupby("gate")["tokens"].sum().tolist() == [32] * 4
