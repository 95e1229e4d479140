"""Copies of a monitored model: ``copy.deepcopy`` and whole-model pickling work, and the copy is
not watched by the original's monitor (a reference model, an EMA copy, a model saved whole)."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import moewatch
from moewatch.taps import tapped
from test_families_exact import moewatch_hooks
from tests.tiny_models import tiny_mixtral

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))


def _someone_elses_hook(module, args, output) -> None:
    return None


def _forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _copies(model, how: str):
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _total(mon) -> dict:
    mon.flush()
    return {name: int(counts.sum()) for name, counts in mon.counts().items()}


@pytest.mark.parametrize("backend", ["staged", "device"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("gate_hooks", ["tapped", "forward hooks"])
def test_a_copy_of_a_monitored_model_runs_unwatched_and_can_be_watched_itself(how, backend, gate_hooks):
    model = tiny_mixtral()
    if gate_hooks == "forward hooks":  # a gate that already has a hook is watched by a hook, not a tap
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(_someone_elses_hook)
    expected = _forward(model)
    one_forward = 2 * 8 * 2  # tokens x top-2
    with moewatch.attach(model, background=False, backend=backend) as mon:
        assert all(tapped(layer.mlp.gate) == (gate_hooks == "tapped") for layer in model.model.layers)
        _forward(model)
        copied = _copies(model, how)
        assert torch.equal(_forward(copied), expected)
        assert set(_total(mon).values()) == {one_forward}, "the copy's forward went into the original's monitor"
        assert not any(tapped(module) for module in copied.modules())
        with moewatch.attach(copied, background=False, backend=backend) as copy_mon:
            assert torch.equal(_forward(copied), expected)
            assert set(_total(copy_mon).values()) == {one_forward}
            assert all(tapped(layer.mlp.gate) == (gate_hooks == "tapped") for layer in copied.model.layers)
        _forward(model)
        assert set(_total(mon).values()) == {2 * one_forward}
        assert mon.errors.total() == 0 and copy_mon.errors.total() == 0
    assert torch.equal(_forward(copied), expected)
    assert not moewatch_hooks(model)
    # the copy keeps inert stand-ins of the original's root hooks (a copy cannot drop them)
    assert all("(tap)" not in hook for hook in moewatch_hooks(copied))
