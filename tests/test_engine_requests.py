"""The requests an engine names behind its forwards (``Engine.requests``), counted into windows.

A serving engine's forward is one flat batch of many requests: its shape says nothing of them,
its scheduler does (vLLM: ``tests/test_vllm.py`` checks the real engine). Here an engine of the
test's own (``moewatch.engines.register_engine``, the public seam) runs a real transformers
model as a flat batch and names the requests of each forward, on both backends; and the two
bookkeepers of request runs agree with a plain recount on random schedules.
"""
from __future__ import annotations

import random
import threading
import types

import numpy as np
import pytest
import torch

import moewatch
import moewatch.engines as engines
from moewatch.discovery import resolve_gates
from moewatch.engines.base import Engine
from moewatch.hotpath.requests import DeviceRequestRuns, HostRequestRuns, RequestTokens
from tests.tiny_models import tiny_mixtral


class ScriptedEngine(Engine):
    """Runs a transformers model as an engine would: one flat [1, T] batch per forward, the
    requests behind it named by the scheduler (here: the test, before each forward)."""

    name = "scripted"

    def __init__(self) -> None:
        self.next: RequestTokens = None

    def gates(self, model, options):
        return resolve_gates(model)

    def requests(self):
        scheduled, self.next = self.next, None
        return scheduled


@pytest.fixture
def engine_model(monkeypatch):
    model, engine = tiny_mixtral(), ScriptedEngine()
    monkeypatch.setattr(engines, "_CLAIMS", [lambda m: engine if m is model else None])
    return model, engine


def _step(model, engine, keys, tokens, finished=()) -> None:
    engine.next = RequestTokens(keys, tokens, finished)
    model(torch.randint(0, 128, (1, sum(tokens))))  # the flat batch: every request in one row


def _recount(steps) -> np.ndarray:
    """(sum of t, sum of t**2) over requests of t tokens in one window, from its steps."""
    per_request: dict = {}
    for keys, tokens in steps:
        for key, t in zip(keys, tokens):
            per_request[key] = per_request.get(key, 0) + t
    values = np.array(list(per_request.values()), dtype=float)
    return np.array([values.sum(), (values ** 2).sum()])


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_an_engines_requests_are_counted_across_its_steps_and_anew_per_window(engine_model, backend):
    model, engine = engine_model
    with moewatch.attach(model, background=False, backend=backend) as mon, torch.no_grad():
        # window 0: a prefill of two requests (5 and 3 tokens), then two decode steps
        first = [(("a", "b"), (5, 3)), (("a", "b"), (1, 1)), (("a", "b"), (1, 1))]
        for keys, tokens in first:
            _step(model, engine, keys, tokens)
        mon.flush()
        # window 1: "a" goes on (its tokens count from 0), "b" ended, "c" arrives with 4
        _step(model, engine, ("a", "c"), (1, 4), finished=("b",))
        _step(model, engine, ("a", "c"), (1, 1))
        mon.flush()
        model(torch.randint(0, 128, (1, 6)))  # a forward the engine said nothing of
        mon.flush()
        windows = list(mon._ring)
    np.testing.assert_allclose(windows[0].rows, _recount(first))  # 12 tokens: 7**2 + 5**2
    assert windows[0].requests == pytest.approx(144 / 74)
    np.testing.assert_allclose(windows[1].rows, [7.0, 2 * 2 + 5 * 5])
    assert windows[1].requests == pytest.approx(49 / 29)
    assert np.isnan(windows[2].requests)  # unknown, not a guess from the batch's shape
    assert mon.error_counts() == {}


def test_without_the_engines_word_a_flat_batch_counts_no_requests(engine_model):
    """The batch's one row is not one request: nothing is counted from an engine's shapes."""
    model, engine = engine_model
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        model(torch.randint(0, 128, (1, 40)))
        mon.flush()
        assert np.isnan(mon.windows()["requests"]).all()


class SteppingEngine(ScriptedEngine):
    """An engine whose steps mark their forwards themselves (``Engine.drive_steps``), as vLLM's
    worker does on the CPU: the root module's hooks do nothing on the step's thread."""

    def drive_steps(self, banks):
        self.banks = banks
        return types.SimpleNamespace(remove=lambda: None)

    def step(self, forward) -> None:
        self.banks.begin_step(None)
        self.stepping_thread = threading.get_ident()
        try:
            forward()
        finally:
            self.stepping_thread = None
            self.banks.end_step()


def test_a_forward_on_another_thread_during_a_step_is_marked_by_the_hooks(monkeypatch):
    """Only the step's own thread skips the root hooks: a forward that another thread runs
    meanwhile is a whole forward of its own, counted at every gate (an engine-wide flag had its
    hooks do nothing, and its gate calls, inside a root call no hook began, counted nothing)."""
    model, engine = tiny_mixtral(), SteppingEngine()
    monkeypatch.setattr(engines, "_CLAIMS", [lambda m: engine if m is model else None])
    ids = {"step": torch.randint(0, 128, (1, 5)), "other": torch.randint(0, 128, (1, 3))}
    with moewatch.attach(model, background=False) as mon, torch.no_grad():
        assert mon._masks.steps is engine

        def inside_the_step():
            other = threading.Thread(target=model, args=(ids["other"],))
            other.start()
            other.join()
            model(ids["step"])

        engine.step(inside_the_step)
        mon.flush()
        tokens = mon.windows().groupby("gate")["tokens"].sum()
        assert len(tokens) == len(mon.gates)
        assert (tokens == 5 + 3).all(), tokens
        assert mon.error_counts() == {}


def _random_schedule(seed: int, steps: int = 400):
    """Steps of (keys, tokens, finished) as an engine makes them, and where windows are cut."""
    rng = random.Random(seed)
    live, next_id, schedule = [], 0, []
    for _ in range(steps):
        finished = [k for k in live if rng.random() < 0.1]
        live = [k for k in live if k not in finished]
        for _ in range(rng.randrange(0, 3)):
            live.append(f"r{next_id}")
            next_id += 1
        running = [k for k in live if rng.random() < 0.9]  # some wait a step (preempted)
        tokens = [rng.choice([1, 1, 1, rng.randrange(1, 60)]) for _ in running]
        schedule.append((tuple(running), tuple(tokens), tuple(finished), rng.random() < 0.15))
    return schedule


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("slots", [4096, 6])
def test_host_and_device_runs_equal_a_recount(seed, slots):
    """Both bookkeepers give each window's (sum of t, sum of t**2) exactly; a device with fewer
    slots than live requests starts its runs again, which can only count more requests."""
    host, rows = HostRequestRuns(), torch.zeros(2, dtype=torch.float64)
    device = DeviceRequestRuns(torch.device("cpu"), rows, slots=slots)
    host_rows, window = np.zeros(2), []
    for keys, tokens, finished, cut in _random_schedule(seed):
        step = RequestTokens(keys, tokens, finished)
        host_rows += host.add(step)
        device.add(step)
        window.append((keys, tokens))
        if cut:
            expected = _recount(window)
            np.testing.assert_allclose(host_rows, expected)
            if slots >= 4096:
                np.testing.assert_allclose(rows.numpy(), expected)
            else:
                assert rows[0].item() == pytest.approx(expected[0])
                assert rows[1].item() <= expected[1] + 1e-9
            host.cut(), device.cut(torch.tensor(True))
            host_rows, window = np.zeros(2), []
            rows.zero_()
    assert (device.restarts > 0) == (slots < 4096)  # the small table did run out


def test_request_tokens_refuse_keys_without_counts():
    with pytest.raises(ValueError, match="2 request keys for 1 token counts"):
        RequestTokens(("a", "b"), (3,))
