"""Faults on the model's side of the hook: every forward returns exactly the bits it returns
unmonitored, and the fault is counted in ``mon.error_counts()`` and exported as
``moewatch_internal_errors_total`` (or, for bad data, in the statistics that describe it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moewatch
import moewatch.hooks
from moewatch.faults import logit_fault
from moewatch.hooks import GateHook

from conftest import tiny_mixtral
from reliability_helpers import ToyMoE, assert_bit_identical, exported, forward, no_hooks, router_counts

GATES = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.fixture(scope="module")
def model():
    return tiny_mixtral()


def ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_adapter_that_cannot_read_its_gate_is_counted_and_the_model_is_untouched():
    """A user's gate returns a dict: the pattern adapter's extract raises TypeError on every call."""
    model = ToyMoE(names=("good", "odd"), dict_gates=("odd",))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    expected = forward(model, x)
    with moewatch.attach(model, gates="routers.*", top_k=2, background=False, model_name="toy") as mon:
        for _ in range(3):
            assert_bit_identical(forward(model, x), expected)
        assert mon.error_counts() == {"hook": 3}
        assert "expected a tensor" in mon.errors.last()["hook"] and "routers.odd" in mon.errors.last()["hook"]
        assert exported(mon, "moewatch_internal_errors_total", component="hook") == 3
        counts = mon.counts()
        assert int(counts["routers.good"].sum()) == 3 * 10 * 2  # the readable gate is still counted
        assert int(counts["routers.odd"].sum()) == 0


def test_exception_inside_a_family_adapter_is_counted(model, monkeypatch):
    """The Mixtral adapter's extract fails on the first gate only; the second is counted exactly."""
    expected = forward(model, ids())
    with router_counts(model) as reference:
        forward(model, ids())
    mon = moewatch.attach(model, background=False, model_name="tiny")
    try:
        (hook,) = [h for h in model.model.layers[0].mlp.gate.forward.observers if isinstance(h, GateHook)]

        def broken_extract(*args):
            raise KeyError("router output layout changed")

        monkeypatch.setattr(hook, "extract", broken_extract)
        assert hook.stage_output is not None  # eager without grad: the reader extracts the kept output
        extracts = list(hook.bank._extract)
        extracts[hook.row] = broken_extract
        monkeypatch.setattr(hook.bank, "_extract", extracts)
        picks = list(hook.bank._picks)  # the reader's shortcut for the triple's members goes too
        picks[hook.row] = None
        monkeypatch.setattr(hook.bank, "_picks", picks)
        for _ in range(4):
            assert_bit_identical(forward(model, ids()), expected)
        counts = mon.counts()  # the reader extracts here, and the broken extract fails
        assert mon.error_counts() == {"hook": 4}
        assert exported(mon, "moewatch_internal_errors_total", component="hook") == 4
        assert int(counts[GATES[0]].sum()) == 0
        np.testing.assert_array_equal(counts[GATES[1]], 4 * reference[GATES[1]])
        model(ids())  # with grad, the hook extracts at once: the failure is counted at the call
        assert mon.error_counts() == {"hook": 5}
    finally:
        mon.detach()


def test_exception_inside_a_statistic_is_counted_and_adds_nothing(model, monkeypatch):
    """The statistics raise on every call of the first gate: those calls add nothing and are
    counted one by one; the other gate's calls, reduced in the same batch, add exactly."""
    import moewatch.hotpath.numpy_backend as backend

    expected = forward(model, ids())
    with router_counts(model) as reference:
        forward(model, ids())
    first_rows = []  # the first logit row of every call of gate 0: how the fault finds its calls
    gate0 = model.get_submodule(GATES[0])
    spy = gate0.register_forward_hook(lambda m, a, out: first_rows.append(out[0][0].detach().clone()))
    real = backend.segment_sums

    def flaky(logits, *args, **kwargs):  # logits [T, E], or the reader's [E, T] numpy array (expert_major)
        first = logits[:, 0] if kwargs.get("expert_major") else logits[0]  # the first token's logits
        if any(torch.equal(torch.as_tensor(first).float(), row.float()) for row in first_rows):
            raise FloatingPointError("statistic failed")
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(backend, "segment_sums", flaky)
    try:
        with moewatch.attach(model, background=False, model_name="tiny") as mon:
            for _ in range(5):
                assert_bit_identical(forward(model, ids()), expected)
            counts = mon.counts()
            assert mon.error_counts() == {"hook": 5}  # one per failed call, not one per batch
            assert "FloatingPointError: statistic failed" in mon.errors.last()["hook"]
            assert exported(mon, "moewatch_internal_errors_total", component="hook") == 5
            assert int(counts[GATES[0]].sum()) == 0
            np.testing.assert_array_equal(counts[GATES[1]], 5 * reference[GATES[1]])
            mon.flush()
            frame = mon.windows().set_index("gate")
            assert frame.loc[GATES[1], "tokens"] == 5 * 16 and frame.loc[GATES[1], "assignments"] == 5 * 32
    finally:
        spy.remove()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_counted_not_propagated_into_the_statistics(model, bad):
    """Some router logits of the first gate are NaN/Inf: counted per logit, other statistics stay finite."""

    def poison(logits: torch.Tensor) -> torch.Tensor:  # [T, E]
        out = logits.clone()
        out[::3, 1] = bad  # tokens 0, 3, 6, ... (6 of 16)
        out[1, :] = bad  # and every logit of token 1
        return out

    with logit_fault(model, poison, layers=[0]):
        expected = forward(model, ids())
        with router_counts(model) as reference:
            forward(model, ids())
        with moewatch.attach(model, background=False, model_name="tiny") as mon:
            assert_bit_identical(forward(model, ids()), expected)
            mon.flush()
            row = mon.windows().set_index("gate").loc[GATES[0]]
            assert mon.error_counts() == {}
            assert row["nonfinite_logits"] == 6 + 8  # expert 1 of tokens 0, 3, ..., 15; all 8 of token 1
            assert exported(mon, "moewatch_internal_errors_total", component="hook") is None
            for gate in GATES:  # a NaN may reach the next layer's router through the hidden states
                assert exported(mon, "moewatch_gate_nonfinite_logits_total", layer=gate) == reference.nonfinite[gate]
            assert reference.nonfinite[GATES[0]] == row["nonfinite_logits"]
            assert row["tokens"] == 16
            for column in ("logit_std", "logit_mean", "entropy_mean", "top1_prob_mean", "zloss_mean"):
                assert np.isfinite(row[column]), column
            counts = mon.counts()  # the model's own decisions, whatever it made of the bad logits
            for gate in GATES:
                np.testing.assert_array_equal(counts[gate], reference[gate])


def outcome(model, *args):
    """The model's output, or the exception it raised."""
    try:
        return forward(model, *args)
    except Exception as error:
        return error


def test_empty_batch(model):
    """Zero tokens: the model's own error is unchanged; the MoE block and a fully padded batch count nothing."""
    empty = torch.zeros((1, 0), dtype=torch.long)
    plain = outcome(model, empty)
    block = model.model.layers[0].mlp
    nothing = torch.zeros(1, 0, model.config.hidden_size)
    expected_block = forward(block, nothing)
    padded = ids(2, 6)
    mask = torch.zeros_like(padded)
    expected_padded = forward(model, padded, attention_mask=mask)
    with moewatch.attach(model, background=False, model_name="tiny") as mon:
        watched = outcome(model, empty)  # transformers 5 raises on 0 tokens: the same error, not one of ours
        if isinstance(plain, torch.Tensor):
            assert_bit_identical(watched, plain)
        else:
            assert (type(watched), str(watched)) == (type(plain), str(plain))
        assert_bit_identical(forward(block, nothing), expected_block)
        assert_bit_identical(forward(model, padded, attention_mask=mask), expected_padded)
        assert mon.error_counts() == {}
        assert all(int(c.sum()) == 0 for c in mon.counts().values())
        mon.flush()
        assert mon.windows().empty  # a window without traffic is not a window
        assert exported(mon, "moewatch_gate_tokens_total", layer=GATES[0]) == 0
        assert mon.health().severity == "ok"


def test_batch_of_one_token(model):
    one = ids(1, 1)
    expected = forward(model, one)
    with router_counts(model) as reference:
        forward(model, one)
    with moewatch.attach(model, background=False, model_name="tiny") as mon:
        assert_bit_identical(forward(model, one), expected)
        mon.flush()
        frame = mon.windows().set_index("gate")
        assert mon.error_counts() == {}
        for gate in GATES:
            np.testing.assert_array_equal(mon.counts()[gate], reference[gate])
            assert frame.loc[gate, "tokens"] == 1 and frame.loc[gate, "assignments"] == 2
            assert np.isfinite(frame.loc[gate, "logit_std"]) and 0 < frame.loc[gate, "margin_mean"] < 1
        assert exported(mon, "moewatch_gate_tokens_total", layer=GATES[0]) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = tiny_mixtral().to(dtype)
    batch = ids(3, 7)
    expected = forward(model, batch)
    assert expected.dtype == dtype
    with router_counts(model) as reference:
        forward(model, batch)
    with moewatch.attach(model, background=False, model_name="tiny") as mon:
        for _ in range(2):
            assert_bit_identical(forward(model, batch), expected)
        mon.flush()
        frame = mon.windows().set_index("gate")
        assert mon.error_counts() == {}
        for gate in GATES:
            np.testing.assert_array_equal(mon.counts()[gate], 2 * reference[gate])
            assert frame.loc[gate, "tokens"] == 2 * 21 and frame.loc[gate, "nonfinite_logits"] == 0
            assert np.isfinite(frame.loc[gate, "logit_std"]) and frame.loc[gate, "logit_std"] > 0
    assert no_hooks(model)


def test_exception_in_a_window_statistic_or_the_detector_is_counted_and_detach_still_completes(model, monkeypatch):
    """Host-side failures: the detector raises on every window, then closing a window itself fails
    (at detach too). Forwards are untouched; detach still removes every hook and stops every thread."""
    expected = forward(model, ids())
    mon = moewatch.attach(model, model_name="tiny", alertmanager_url="http://127.0.0.1:9")
    try:
        monkeypatch.setattr(mon._detector, "update", lambda *a: (_ for _ in ()).throw(ArithmeticError("bad window")))
        assert_bit_identical(forward(model, ids()), expected)
        health = mon.flush()
        assert "detector failed: ArithmeticError: bad window" in health.note
        assert mon.error_counts() == {"detector": 1}
        assert exported(mon, "moewatch_internal_errors_total", component="detector") == 1

        def broken_close(*args):
            raise MemoryError("no room for a window")

        monkeypatch.setattr(moewatch.monitor, "close_window", broken_close)
        assert_bit_identical(forward(model, ids()), expected)
    finally:
        mon.detach()  # its last flush fails: counted (a fault while reducing), and the rest of detach still runs
    assert not mon.attached and no_hooks(model)
    assert mon.error_counts().get("reader") == 1 and "no room for a window" in mon.errors.last()["reader"]
    assert exported(mon, "moewatch_up") == 0
    assert_bit_identical(forward(model, ids()), expected)
    moewatch.attach(model, background=False).detach()  # the model is free again
