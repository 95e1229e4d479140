"""A fault in marking an engine's step never fails the step (``vllm_plugin``'s wrapper of
``Worker.execute_model``, ``VllmEngine.begin_step`` / ``end_step`` / ``step_failed``).

The wrapper runs here around a real transformers model monitored by moewatch, with the vLLM
engine object driving its banks as on vLLM's CPU platform (``VllmEngine.drive_steps``); vLLM
itself is not needed: the wrapper, the engine and the banks are moewatch's own. The real
engine's steps are covered by ``tests/test_vllm.py``.
"""
from __future__ import annotations

import types

import pytest
import torch

import moewatch
from moewatch.engines import vllm as vllm_engine
from moewatch.engines.vllm_plugin import _wrap_execute
from tests.tiny_models import tiny_mixtral

TOKENS = 6


@pytest.fixture
def driven(monkeypatch):
    """(monitor, engine, execute_model, worker): a step runs one forward of TOKENS tokens."""
    model = tiny_mixtral()
    mon = moewatch.attach(model, background=False)
    engine = vllm_engine.VllmEngine()
    engine._driven = [mon._masks.banks]
    mon._masks.steps = engine
    monkeypatch.setitem(vllm_engine._ENGINES, model, engine)
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))

    def original(worker, scheduler_output):  # the worker's step: one forward of the model
        with torch.no_grad():
            model(torch.randint(0, 128, (1, TOKENS)))
        return "step output"

    try:
        yield mon, engine, _wrap_execute(original), worker
    finally:
        mon.detach()


def _step():
    return types.SimpleNamespace(num_scheduled_tokens={"a": TOKENS}, finished_req_ids=set())


def _tokens_per_gate(mon):
    mon.flush()
    return mon.windows().groupby("gate")["tokens"].sum()


def test_a_driven_step_counts_its_forward_once(driven):
    mon, engine, execute_model, worker = driven
    for _ in range(3):
        assert execute_model(worker, _step()) == "step output"
    assert engine._driven  # still driving
    assert (_tokens_per_gate(mon) == 3 * TOKENS).all()
    assert mon.error_counts() == {}


@pytest.mark.parametrize("where", ["bank", "engine"])
def test_a_failing_begin_leaves_the_step_to_the_hooks_and_is_counted(driven, monkeypatch, where):
    """A bank that raises as the step begins, or a fault of ``begin_step`` itself (both caught
    by the wrapper): the step runs and returns its output, the
    fault is counted once in the monitor's errors, and from then on the hooks mark every
    forward, each counted once at every gate."""
    mon, engine, execute_model, worker = driven
    if where == "bank":
        monkeypatch.setattr(mon._masks.banks, "begin_step", _raises(RuntimeError("bank fault")))
    else:
        monkeypatch.setattr(vllm_engine.VllmEngine, "begin_step", _raises(NameError("engine fault")))
    for _ in range(2):
        assert execute_model(worker, _step()) == "step output"
    assert engine._driven == [] and engine.stepping_thread is None
    assert (_tokens_per_gate(mon) == 2 * TOKENS).all()
    assert mon.error_counts() == {"hook": 1}


def test_a_failing_end_still_ends_and_counts_the_steps_forward(driven, monkeypatch):
    mon, engine, execute_model, worker = driven
    banks = mon._masks.banks
    end_step = banks.end_step
    failures = []

    def end_once_failing():
        if not failures:
            failures.append(1)
            raise RuntimeError("end fault")
        end_step()

    monkeypatch.setattr(banks, "end_step", end_once_failing)
    assert execute_model(worker, _step()) == "step output"
    assert execute_model(worker, _step()) == "step output"  # marked by the hooks now
    assert engine._driven == [] and engine.stepping_thread is None
    assert (_tokens_per_gate(mon) == 2 * TOKENS).all()
    assert mon.error_counts() == {"hook": 1}


def _raises(error: Exception):
    def fail(*args, **kwargs):
        raise error
    return fail
