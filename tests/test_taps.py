"""Gate taps (moewatch.taps): the gate's forward, wrapped, instead of a forward hook."""
import inspect

import numpy as np
import torch

import moewatch
from moewatch import faults
from moewatch.taps import Tap, tapped
from tests.conftest import padded_batch, tiny_mixtral


def _gates(model):
    return [m for n, m in model.named_modules() if n.endswith("block_sparse_moe.gate") or n.endswith("mlp.gate")]


def _run(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_attach_taps_gates_without_forward_hooks_and_detach_restores_them():
    model = tiny_mixtral()
    gates = _gates(model)
    assert gates
    signatures = [inspect.signature(g.forward) for g in gates]
    mon = moewatch.attach(model, background=False)
    assert all(tapped(g) for g in gates)
    assert all(not g._forward_hooks for g in gates)  # no hook: __call__ keeps its fast path
    assert [inspect.signature(g.forward) for g in gates] == signatures
    mon.detach()
    assert all("forward" not in g.__dict__ for g in gates)


def test_a_fault_added_after_attach_is_seen_by_the_monitor_and_the_model():
    model = tiny_mixtral()
    ids, mask = padded_batch()
    healthy = _run(model, ids, mask)
    mon = moewatch.attach(model, background=False)
    with faults.dead_expert(model, expert=3):
        faulted = _run(model, ids, mask)
        counts = mon.counts()
        assert all(int(c[3]) == 0 for c in counts.values()), counts  # the observer saw the fault
        assert int(sum(c.sum() for c in counts.values())) > 0
    assert not torch.equal(faulted, healthy)  # the model received the faulted routing
    assert torch.equal(_run(model, ids, mask), healthy)  # fault removed: the model is as before
    assert all(tapped(g) for g in _gates(model))  # the monitor's observers keep the taps
    mon.detach()
    assert all("forward" not in g.__dict__ for g in _gates(model))


def test_a_gate_whose_forward_someone_patched_is_hooked_and_left_as_it_was():
    model = tiny_mixtral()
    ids, mask = padded_batch()
    gate = _gates(model)[0]
    inner = gate.forward
    calls = []

    def patched(*args, **kwargs):  # as accelerate's hooks do
        calls.append(1)
        return inner(*args, **kwargs)

    gate.forward = patched
    mon = moewatch.attach(model, background=False)
    assert gate.__dict__["forward"] is patched and gate._forward_hooks  # a hook there, no tap
    _run(model, ids, mask)
    counts = mon.counts()
    assert len({int(c.sum()) for c in counts.values()}) == 1  # the hooked gate counted like the tapped ones
    assert calls
    mon.detach()
    assert gate.__dict__["forward"] is patched and not gate._forward_hooks


def test_a_tap_wrapped_by_someone_else_stays_as_a_pass_through_after_detach():
    model = tiny_mixtral()
    ids, mask = padded_batch()
    healthy = _run(model, ids, mask)
    mon = moewatch.attach(model, background=False)
    gate = _gates(model)[0]
    tap = gate.__dict__["forward"]
    assert isinstance(tap, Tap)

    def outer(*args, **kwargs):
        return tap(*args, **kwargs)

    gate.forward = outer
    mon.detach()
    assert gate.__dict__["forward"] is outer  # not pulled from under the other wrapper
    assert not tap.observers and not tap.transforms
    before = {k: np.array(v) for k, v in mon.counts().items()}
    assert torch.equal(_run(model, ids, mask), healthy)
    after = mon.counts()  # the pass-through observes nothing
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_compiled_fullgraph_counts_through_taps_as_eager():
    model = tiny_mixtral()
    ids, mask = padded_batch()
    plain = _run(model, ids, mask)
    eager = moewatch.attach(model, background=False)
    _run(model, ids, mask)
    expected = {k: v.copy() for k, v in eager.counts().items()}
    eager.detach()
    mon = moewatch.attach(model, background=False)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).logits
    assert torch.equal(out, plain)
    got = mon.counts()
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in expected.items()}
    mon.detach()


def test_a_gate_with_a_hook_that_rewrites_its_output_is_hooked_and_the_monitor_sees_the_rewrite():
    """The model consumes what the gate's hooks return: a monitor attached after such a hook sees it."""
    model = tiny_mixtral()
    ids, mask = padded_batch()
    gates = _gates(model)

    def no_expert_3(module, args, output):
        logits = output[0].clone()
        logits[:, 3] = -1e4
        weights, indices = torch.topk(torch.softmax(logits, dim=-1), module.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), indices

    handles = [g.register_forward_hook(no_expert_3) for g in gates]
    mon = moewatch.attach(model, background=False)
    assert not any(tapped(g) for g in gates) and all(len(g._forward_hooks) == 2 for g in gates)
    _run(model, ids, mask)
    counts = mon.counts()
    assert all(int(c[3]) == 0 and int(c.sum()) > 0 for c in counts.values()), counts
    mon.detach()
    assert all(list(g._forward_hooks.values()) == [no_expert_3] for g in gates)
    for handle in handles:
        handle.remove()
