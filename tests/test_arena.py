"""Prefill-sized eager gate calls are copied into the staging arena, and their outputs let go.

Holding a big call's outputs until the reader reduces them costs the model page faults under
glibc's malloc (``moewatch.hotpath.arena``); the copies must count exactly what the held
outputs counted, their slots must come back for reuse, and a full arena falls back to holding.
"""
import gc
import weakref

import numpy as np
import pytest
import torch

import moewatch
from moewatch.hotpath import arena as arena_module
from moewatch.hotpath import staged
from moewatch.hotpath.arena import MIN_SLOT_BYTES, StagingArena
from tests.conftest import padded_batch, tiny_mixtral


def test_a_copy_equals_its_source_and_its_slot_is_reused_once_given_back():
    arena = StagingArena(max_bytes=64 * 2**20)
    source = torch.randn(300, 8)
    copy = arena.copy(source)
    view = arena.view(copy)
    np.testing.assert_array_equal(view, source.numpy())
    assert view.dtype == np.float32 and view.shape == (300, 8)
    assert not np.shares_memory(view, source.numpy())
    address = view.ctypes.data
    arena.give(copy)
    assert arena.slots()[0] == 1
    again = arena.view(arena.copy(source[:260]))  # a smaller call of the same size class: the same slot
    assert again.ctypes.data == address
    np.testing.assert_array_equal(again, source[:260].numpy())
    strided = torch.arange(600).reshape(300, 2).t()  # not contiguous
    np.testing.assert_array_equal(arena.view(arena.copy(strided)), strided.numpy())
    offset = torch.arange(1000, dtype=torch.int32)[100:400].reshape(150, 2)  # a view with a storage offset
    np.testing.assert_array_equal(arena.view(arena.copy(offset)), offset.numpy())


def test_a_slots_view_is_made_again_only_for_another_shape_and_always_reads_the_new_copy():
    """The reader's views of a slot are kept per slot (a step's calls come back at the same
    shapes): the same shape and dtype get the same array, reading what was copied last."""
    arena = StagingArena(max_bytes=64 * 2**20)
    first = torch.randn(300, 8)
    copy = arena.copy(first)
    view = arena.view(copy)
    arena.give(copy)
    second = torch.randn(300, 8)
    again = arena.view(arena.copy(second))
    assert again is view  # the same slot, shape and dtype: the kept view
    np.testing.assert_array_equal(again, second.numpy())
    arena.give(copy)
    third = torch.randint(0, 8, (600, 2))  # the same size class (9,600 bytes), another shape and dtype
    other = arena.view(arena.copy(third))
    assert other is not view and other.ctypes.data == view.ctypes.data
    np.testing.assert_array_equal(other, third.numpy())


def test_a_full_arena_or_a_dtype_numpy_cannot_read_gets_no_copy():
    arena = StagingArena(max_bytes=2 * 2**20)
    assert arena.copy(torch.zeros(2**20 // 4)) is None  # a chunk is 8 MiB: over the limit
    assert arena.copy(torch.zeros(4)) is None
    assert arena.slots() == (0, 0)
    assert MIN_SLOT_BYTES <= 8 * 2**20
    assert StagingArena(max_bytes=64 * 2**20).copy(torch.zeros(300, 8, dtype=torch.bfloat16)) is None


def _prefill():
    return padded_batch(seed=3, batch=3, length=100)  # 300 tokens: over staged.ARENA_MIN_TOKENS


def _shared_arena() -> StagingArena:
    return arena_module.shared(staged.MAX_STAGED_BYTES // 2)


def _counts(model, ids, mask, forwards=3):
    """Counts and errors of ``forwards`` monitored forwards, and of the process's arena: the
    copies made into it, the slots they held before the reduction and after the detach."""
    arena = _shared_arena()
    made, in_use = arena.copies_made, arena.in_use()
    mon = moewatch.attach(model, background=False)
    assert all(bank._arena is arena for bank in mon._banks.banks)
    with torch.no_grad():
        for _ in range(forwards):
            model(ids, attention_mask=mask)
    held = arena.in_use() - in_use
    counts, errors = mon.counts(), mon.error_counts()
    mon.detach()
    return counts, errors, (arena.copies_made - made, held, arena.in_use() - in_use)


def test_prefill_calls_are_copied_count_exactly_and_give_their_slots_back(one_thread, monkeypatch):
    model = tiny_mixtral()
    ids, mask = _prefill()
    assert ids.numel() >= staged.ARENA_MIN_TOKENS
    copied, errors, arena = _counts(model, ids, mask)
    assert errors == {}
    # logits and indices, 2 gates, 3 forwards: copied, each in a slot until the reduction
    assert arena[:2] == (2 * 2 * 3, 2 * 2 * 3), "the prefill calls were not copied into the arena"
    assert arena[2] == 0, "every copy's slot is given back"
    monkeypatch.setattr(staged, "ARENA_MIN_TOKENS", 10**9)  # the same calls held by reference
    held, errors, arena = _counts(model, ids, mask)
    assert errors == {} and arena == (0, 0, 0)
    assert set(copied) == set(held)
    for name in held:
        np.testing.assert_array_equal(copied[name], held[name])
    for name in held:  # not vacuous: padded tokens are left out, every real one is counted twice
        assert held[name].sum() == 3 * int(mask.sum()) * 2


def test_a_monitor_attached_after_another_reuses_its_slots_without_mapping_more(one_thread):
    """The arena is the process's: attaching again (around each evaluation run, say) must not
    map and fault in fresh memory for the same traffic."""
    model = tiny_mixtral()
    ids, mask = _prefill()
    arena = _shared_arena()
    first, _, made = _counts(model, ids, mask, forwards=2)
    mapped = arena.slots()[1]
    again, errors, made_again = _counts(model, ids, mask, forwards=2)
    assert errors == {} and made[0] == made_again[0] == 2 * 2 * 2
    assert arena.slots()[1] == mapped, "the second monitor mapped memory of its own"
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])


@pytest.mark.parametrize("tokens, released", [(300, True), (12, False)])
def test_a_prefill_calls_output_is_let_go_at_once_a_decode_calls_is_held(one_thread, tokens, released):
    model = tiny_mixtral()
    ids, mask = padded_batch(seed=3, batch=3, length=tokens // 3)
    mon = moewatch.attach(model, background=False)
    outputs = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda module, inputs, output: outputs.append(weakref.ref(output[0])))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    gc.collect()
    assert (outputs[0]() is None) == released
    mon.counts()  # the reader reduces the call: the held output goes too
    gc.collect()
    assert outputs[0]() is None
    mon.detach()


def test_outputs_that_cannot_be_copied_are_held_and_still_count(one_thread, monkeypatch):
    model = tiny_mixtral()
    ids, mask = _prefill()
    expected, _, _ = _counts(model, ids, mask, forwards=1)
    monkeypatch.setattr(StagingArena, "copy", lambda self, tensor: None)  # a full arena
    got, errors, arena = _counts(model, ids, mask, forwards=1)
    assert errors == {} and arena == (0, 0, 0)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_reusing_the_slots_leaves_the_parents_staged_copies_alone(one_thread):
    import os

    model = tiny_mixtral()
    ids, mask = _prefill()
    other_ids, other_mask = padded_batch(seed=8, batch=3, length=100)
    expected, _, _ = _counts(model, ids, mask, forwards=1)
    mon = moewatch.attach(model, background=False)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # staged in arena slots, not reduced yet
    pid = os.fork()
    if pid == 0:  # the child reduces what it inherited, then reuses those slots for its own forward
        code = 1
        try:
            mon.counts()
            with torch.no_grad():
                model(other_ids, attention_mask=other_mask)
            mon.counts()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = mon.counts()
    mon.detach()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("how", ["inference_mode", "compiled"])
def test_copied_prefill_calls_go_to_the_arena_with_their_mask_and_count_exactly(how, one_thread):
    """Inference tensors and compiled code are copied, never held: prefill-sized ones into the
    arena, the padding mask's columns with them."""
    model = tiny_mixtral()
    ids, mask = _prefill()
    expected, _, _ = _counts(model, ids, mask, forwards=1)
    torch._dynamo.reset()
    arena = _shared_arena()
    made, in_use = arena.copies_made, arena.in_use()
    mon = moewatch.attach(model, background=False)
    try:
        run = torch.compile(model, backend="eager", fullgraph=True) if how == "compiled" else model
        context = torch.inference_mode if how == "inference_mode" else torch.no_grad
        with context():
            run(ids, attention_mask=mask)
            run(ids, attention_mask=mask)
        got = mon.counts()
        assert mon.error_counts() == {}
        # logits, indices and the mask's columns of each call: 2 gates, 2 forwards
        assert arena.copies_made - made == 3 * 2 * 2
        assert arena.in_use() == in_use, "every copy's slot is given back"
        for name in expected:
            np.testing.assert_array_equal(got[name], 2 * expected[name])
    finally:
        mon.detach()
        torch._dynamo.reset()
