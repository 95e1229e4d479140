"""Threads and the monitor's life cycle: concurrent forwards, a second attach, detach under load,
and attach refused for a bad baseline. Outputs stay bit-identical and counts stay exact."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

import moewatch

from conftest import tiny_mixtral
from reliability_helpers import assert_bit_identical, exported, forward, no_hooks, router_counts

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.fixture
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test's threads are the concurrency
    yield
    torch.set_num_threads(before)


def batch(seed: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (2, length + seed), generator=torch.Generator().manual_seed(seed))


def test_eight_threads_forward_concurrently_with_exact_counts(one_intra_op_thread):
    """8 threads, each with its own batch, with the reader thread snapshotting meanwhile.

    (Padded batches on several threads, whose masks must not mix: tests/test_concurrency.py.)
    """
    model = tiny_mixtral()
    batches = [batch(s) for s in range(8)]
    expected = [forward(model, b) for b in batches]
    with router_counts(model) as reference:
        for b in batches:
            forward(model, b)
    repeats = 4
    mon = moewatch.attach(model, model_name="tiny", window_tokens=64)  # windows close while threads run
    failures = []

    def worker(i: int) -> None:
        try:
            for _ in range(repeats):
                assert_bit_identical(forward(model, batches[i]), expected[i])
        except BaseException as error:  # reported on the main thread
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        mon.flush()
        assert failures == []
        assert mon.error_counts() == {}
        tokens = repeats * sum(b.numel() for b in batches)
        frame = mon.windows()
        for gate in GATES:
            np.testing.assert_array_equal(mon.counts()[gate], repeats * reference[gate])
            assert exported(mon, "moewatch_gate_tokens_total", layer=gate) == tokens
            assert int(frame[frame["gate"] == gate]["tokens"].sum()) == tokens  # no window lost or doubled
    finally:
        mon.detach()


def test_attach_twice_is_a_clear_error_and_the_first_monitor_keeps_counting():
    """Documented behaviour: one monitor per model; a second attach raises and changes nothing."""
    model = tiny_mixtral(layers=1)
    x = batch(0)
    expected = forward(model, x)
    first = moewatch.attach(model, background=False)
    try:
        def hooks_and_observers():
            return {n: (len(m._forward_hooks), len(getattr(m.__dict__.get("forward"), "observers", ())))
                    for n, m in model.named_modules()}

        hooks_before = hooks_and_observers()
        assert any(observers for _, observers in hooks_before.values())
        with pytest.raises(RuntimeError) as info:
            moewatch.attach(model, background=False)
        message = str(info.value)
        assert "already attached" in message and "MixtralForCausalLM" in message and "detach()" in message
        assert hooks_and_observers() == hooks_before
        assert_bit_identical(forward(model, x), expected)
        assert int(first.counts()["model.layers.0.mlp.gate"].sum()) == x.numel() * 2  # once, not twice
        assert first.error_counts() == {}
    finally:
        first.detach()
    second = moewatch.attach(model, background=False)  # after detach, a new monitor is fine
    second.detach()
    assert no_hooks(model)


def test_detach_while_threads_run_forwards(one_intra_op_thread):
    """4 threads keep running forwards through detach: no error, same bits, counts stop, hooks gone."""
    model = tiny_mixtral()
    x = batch(1)
    expected = forward(model, x)
    with router_counts(model) as reference:
        forward(model, x)
    mon = moewatch.attach(model, model_name="tiny", window_tokens=32)
    mon.serve_prometheus(port=0)
    done = [0] * 4
    progress = threading.Condition()
    stop = threading.Event()
    failures = []

    def worker(i: int) -> None:
        try:
            while not stop.is_set():
                assert_bit_identical(forward(model, x), expected)
                with progress:
                    done[i] += 1
                    progress.notify_all()
        except BaseException as error:
            failures.append(error)
            with progress:
                progress.notify_all()

    def wait_each(at_least: list) -> list:
        with progress:
            assert progress.wait_for(lambda: failures or all(d >= a for d, a in zip(done, at_least)), timeout=300)
            return list(done)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_each([3] * 4)
        mon.detach()
        # Every forward that began before the hooks came off has ended once each thread finished
        # two more; from then on nothing may be counted.
        settled = wait_each([d + 2 for d in wait_each([0] * 4)])
        frozen = mon.counts()
        wait_each([d + 3 for d in settled])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert no_hooks(model)
    assert mon.error_counts() == {}
    assert not mon.attached and exported(mon, "moewatch_up") == 0
    after = mon.counts()
    for gate in GATES:
        np.testing.assert_array_equal(after[gate], frozen[gate])
        # whole forwards only: the counts are a multiple of one forward's
        calls = after[gate].sum() // reference[gate].sum()
        assert calls >= 12
        np.testing.assert_array_equal(after[gate], calls * reference[gate])


def moewatch_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("moewatch")}


@pytest.mark.parametrize("problem", ["corrupt", "truncated", "mismatched", "missing"])
def test_attach_with_a_bad_baseline_fails_clearly_and_leaves_the_model_as_it_was(tmp_path, problem):
    model = tiny_mixtral(layers=1)
    x = batch(2)
    expected = forward(model, x)
    path = tmp_path / "baseline.json"
    if problem in ("corrupt", "truncated", "mismatched"):
        other = tiny_mixtral(layers=1, experts=4)  # a healthy baseline, but of a 4-expert model
        with moewatch.attach(other, background=False, window_tokens=16) as rec:
            for seed in range(10):
                forward(other, batch(seed, length=8 - seed % 2))
                rec.flush()
            rec.baseline().save(path)
        text = path.read_text()
        if problem == "corrupt":
            path.write_text(text.replace('"num_experts": 4', '"num_experts": "four"', 1))
        elif problem == "truncated":
            path.write_text(text[: len(text) // 2])
        json.loads(text)  # the untouched file was valid
    threads_before = moewatch_threads()
    words = {"corrupt": ["num_experts", "four"], "truncated": ["is corrupt", "not valid JSON"],
             "mismatched": ["does not match", "has 8 experts, the baseline 4"],
             "missing": ["does not exist", "Baseline.save()"]}[problem]
    with pytest.raises(moewatch.BaselineError) as info:
        moewatch.attach(model, baseline=str(path), alertmanager_url="http://127.0.0.1:9", dump_dir=str(tmp_path))
    for word in words:
        assert word in str(info.value)
    assert str(path) in str(info.value) or problem == "mismatched"
    assert no_hooks(model)  # nothing was left behind ...
    assert moewatch_threads() <= threads_before  # ... not even an exporter thread
    assert_bit_identical(forward(model, x), expected)
    moewatch.attach(model, background=False).detach()  # and the model can be attached normally


def test_a_model_dropped_without_detach_leaves_nothing_registered():
    """Monitors whose models are dropped undetached (an evaluation that attaches per checkpoint
    and forgets detach) release their banks: accumulators and co-selection held per monitor."""
    import gc

    from moewatch.hotpath import ops

    gc.collect()
    before = len(ops._BANKS)
    for _ in range(3):
        model = tiny_mixtral()
        mon = moewatch.attach(model)
        forward(model, batch(1))
        del model, mon
    gc.collect()
    assert len(ops._BANKS) == before  # each monitor had registered its banks (2 a monitor before)
    for _ in range(100):  # their readers were told to stop: they end at once
        if not moewatch_threads():
            break
        time.sleep(0.05)
    assert moewatch_threads() == set()
