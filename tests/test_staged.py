"""The CPU backend stages gate calls for the reader: what it keeps, and how it stays exact.

Eager forwards are kept by reference with their version counters; inference tensors (no
version counter) and compiled code are copied. A gate output modified in place before the
reader reduced it is detected, counted and not counted as traffic. Big calls are reduced on
the forward's thread (bounded staged memory).
"""
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from moewatch.hotpath import staged
from tests.conftest import padded_batch, tiny_mixtral


def _expected(model, ids, mask):
    mon = moewatch.attach(model, background=False)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    counts = mon.counts()
    mon.detach()
    return counts


def test_inference_mode_forwards_are_copied_and_count_exactly(one_thread):
    model = tiny_mixtral()
    ids, mask = padded_batch()
    expected = _expected(model, ids, mask)
    mon = moewatch.attach(model, background=False)
    with torch.inference_mode():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    got = mon.counts()
    mon.detach()
    assert mon.error_counts() == {}
    for name in expected:
        np.testing.assert_array_equal(got[name], 2 * expected[name])


class InPlaceAfterRouter(nn.Module):
    """A model that scales its router logits in place after routing (the hook saw them first)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        logits = self.router(x)  # [T, 8]
        chosen = torch.topk(logits, 2, dim=-1).indices
        logits.mul_(0.5)  # in place, after the gate's hook ran
        return chosen


def test_a_gate_output_modified_in_place_before_the_reader_is_detected_not_miscounted(one_thread):
    torch.manual_seed(0)
    model = InPlaceAfterRouter()
    mon = moewatch.attach(model, gates="router", top_k=2, background=False)
    with torch.no_grad():
        model(torch.randn(5, 16))
    counts = mon.counts()
    mon.detach()
    assert mon.error_counts() == {"hook": 1}
    assert "modified in place" in mon.errors.last()["hook"]
    assert int(counts["router"].sum()) == 0


def test_calls_beyond_the_staging_budget_are_reduced_on_the_forward_thread(one_thread, monkeypatch):
    model = tiny_mixtral()
    ids, mask = padded_batch()
    expected = _expected(model, ids, mask)
    monkeypatch.setattr(staged, "MAX_STAGED_BYTES", 64)  # every call is over budget
    mon = moewatch.attach(model, background=False)
    bank = mon._banks.banks[0]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert bank._staged_bytes == 0  # nothing held: reduced where it happened
    got = mon.counts()
    mon.detach()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_staged_and_device_backends_report_the_same_windows(one_thread):
    """The batched reduction of the staged backend equals the per-call device path (reference)."""
    model = tiny_mixtral(layers=2)
    frames = []
    for backend in ("staged", "device"):
        mon = moewatch.attach(model, background=False, backend=backend, window_tokens=30, capacity_factor=1.0)
        for seed in range(6):
            ids, mask = padded_batch(seed=seed, batch=3, length=5 + seed)
            with torch.no_grad():
                model(ids, attention_mask=mask)
        mon.flush()
        frames.append(mon.windows())
        mon.detach()
    a, b = frames
    assert len(a) == len(b) > 2
    for column in ("tokens", "assignments", "dropped", "dead_experts"):
        assert a[column].tolist() == b[column].tolist()
    for column in ("entropy_mean", "logit_mean", "logit_std", "logit_absmax", "top1_prob_mean", "margin_mean",
                   "zloss_mean", "effective_experts"):
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-6, atol=1e-9)
    for x, y in zip(a["expert_counts"], b["expert_counts"]):
        np.testing.assert_array_equal(x, y)


def test_reader_polls_hold_forwards_no_cut_needs_and_every_read_still_counts_them(one_thread, monkeypatch):
    """The reader's polls reduce only at a window cut, at HOLD_CALLS calls, or when asked to
    (flush, counts()): one batched reduction instead of one per poll. Windows, counts and
    their order are those of reducing at every poll."""
    model = tiny_mixtral(layers=2)
    runs = []
    monkeypatch.setattr(staged, "LOOK_FORWARDS", 1)  # every poll takes (see the next test)
    for hold_calls in (1, staged.HOLD_CALLS):  # 1: every poll reduces what it took
        monkeypatch.setattr(staged, "HOLD_CALLS", hold_calls)
        mon = moewatch.attach(model, background=False, window_tokens=40)
        bank = mon._banks.banks[0]
        held = []
        for seed in range(8):
            ids, mask = padded_batch(seed=seed, batch=2, length=6 + seed)
            with torch.no_grad():
                model(ids, attention_mask=mask)
            mon._poll()  # what the reader thread does every poll
            held.append(len(bank.waiting()))
        counts_mid = mon.counts()  # a read reduces every ended forward
        assert bank.waiting() == []
        for seed in range(8, 12):
            ids, mask = padded_batch(seed=seed, batch=2, length=6)
            with torch.no_grad():
                model(ids, attention_mask=mask)
            mon._poll()
        mon.flush()
        runs.append((held, counts_mid, mon.counts(), mon.windows()))
        mon.detach()
    (held_1, mid_1, end_1, frame_1), (held_n, mid_n, end_n, frame_n) = runs
    assert max(held_1) == 0 and max(held_n) > 0  # held between polls, until a cut took them
    assert len(frame_1) == len(frame_n) > 3
    assert frame_1["tokens"].tolist() == frame_n["tokens"].tolist()
    for x, y in zip(frame_1["expert_counts"], frame_n["expert_counts"]):
        np.testing.assert_array_equal(x, y)
    # float32 sums over other batches of calls: equal to rounding
    np.testing.assert_allclose(frame_1["entropy_mean"].to_numpy(), frame_n["entropy_mean"].to_numpy(), rtol=1e-6)
    for name in mid_1:
        np.testing.assert_array_equal(mid_1[name], mid_n[name])
        np.testing.assert_array_equal(end_1[name], end_n[name])


def test_polls_take_the_forwards_at_most_every_look_seconds_and_cut_the_same_windows(one_thread, monkeypatch):
    """Most polls only check that nothing is due (a look costs a slow forward's cold caches
    more than its calls): they take the committed forwards every LOOK_SECONDS, or when
    LOOK_FORWARDS wait, and at a look only where the waiting forwards' rows (B x L tokens) could
    fill the window. The windows are those of taking at every poll: each is cut at the forward
    where it filled, at that forward's time, however late it is taken."""
    model = tiny_mixtral(layers=2)
    runs = []
    for look_seconds, look_forwards in ((0.0, 1), (3600.0, 5), (0.0, staged.LOOK_FORWARDS)):
        monkeypatch.setattr(staged, "LOOK_SECONDS", look_seconds)
        monkeypatch.setattr(staged, "LOOK_FORWARDS", look_forwards)
        mon = moewatch.attach(model, background=False, window_tokens=40)
        bank = mon._banks.banks[0]
        waiting, ends, could_fill = [], [], []
        for seed in range(14):
            ids, mask = padded_batch(seed=seed, batch=2, length=6 + seed % 5)
            with torch.no_grad():
                model(ids, attention_mask=mask)
            ends.append(bank._committed[-1][0])  # the forward's commit time
            mon._poll()  # what the reader thread does every poll
            waiting.append(len(bank._committed))
            if bank._committed:  # left waiting: their rows' tokens could not fill the window
                could_fill.append(bank._window_tokens + bank._waiting_bound >= 40)
        mon.flush()
        frame = mon.windows()
        runs.append((waiting, ends, frame, could_fill))
        mon.detach()
    (waiting_0, ends_0, frame_0, _), (waiting_n, ends_n, frame_n, _), (waiting_b, ends_b, frame_b, fill_b) = runs
    assert max(waiting_0) == 0  # every poll took
    # the first poll takes; then only when 5 forwards wait: 0, 1, 2, 3, 4, 0, 1, ...
    assert waiting_n == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3], waiting_n
    # looks due at every poll, taken only where the rows bound says the window may fill
    assert max(waiting_b) > 0 and waiting_b.count(0) >= 3 and not any(fill_b), (waiting_b, fill_b)
    for frame in (frame_n, frame_b):
        assert len(frame_0) == len(frame) > 3
        assert frame_0["tokens"].tolist() == frame["tokens"].tolist()
        for x, y in zip(frame_0["expert_counts"], frame["expert_counts"]):
            np.testing.assert_array_equal(x, y)
    # windows taken late are still cut at a forward's end, at its time: the same forwards as above
    positions_0 = [ends_0.index(t) for t in frame_0.groupby("window")["t_end"].first().tolist()[:-1]]
    for frame, ends in ((frame_n, ends_n), (frame_b, ends_b)):
        full = frame.groupby("window")["t_end"].first().tolist()[:-1]  # the last window: flush's
        assert [ends.index(t) for t in full] == positions_0


def test_the_reader_reduces_on_its_own_thread_alone_and_the_model_keeps_its_threads():
    """The reader's batched reductions never start an OpenMP team beside the model's threads;
    the model's thread count (and torch's setting for new threads) is left as it was."""
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)  # a thread count the reader must not inherit
    threads_before = torch.get_num_threads()
    model = tiny_mixtral()
    ids, mask = padded_batch()
    seen = []
    mon = moewatch.attach(model, window_tokens=1, window_seconds=0.05)
    mon.add_listener(lambda window, health: seen.append((threading.current_thread().name, torch.get_num_threads())))
    try:
        with torch.no_grad():
            for _ in range(50):
                model(ids, attention_mask=mask)
                if seen:
                    break
                time.sleep(0.05)
    finally:
        mon.detach()
    on_reader = {count for name, count in seen if name == "moewatch-reader"}
    assert on_reader == {1}  # (detach closes the last window on this thread, with its own count)
    assert torch.get_num_threads() == threads_before
    fresh = []
    worker = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert fresh == [threads_before]  # a thread the user starts later still gets the model's count


def _bank(num_gates=2, capacity_factor=0.0):
    from moewatch.errors import ErrorLog
    from moewatch.hotpath.layout import SOFTMAX

    gates = [staged.GateParams(f"g{i}", num_experts=8, top_k=2, scoring=SOFTMAX, capacity_factor=capacity_factor)
             for i in range(num_gates)]
    return staged.StagedBank(gates, ErrorLog())


def _reduced(bank):
    bank.take(float("inf"), False, lambda *cut: None)
    return bank.live()


def test_one_batched_reduction_of_mixed_calls_equals_reducing_them_one_by_one():
    """A window whose calls mix the router's own indices with none, and padding weights with
    none, across two gates of one kind: the batched reduction (or its fall-back) gives exactly
    the sums of reducing every call alone."""
    torch.manual_seed(0)
    calls = []
    for n in range(12):
        tokens = 1 + n % 5
        logits = torch.randn(tokens, 8)
        # the router's own choice (not the logits' top-2, so a mix-up shows), or None: top-2 of the logits
        indices = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)]) if n % 3 else None  # [T, 2]
        valid = (torch.rand(tokens) > 0.3).float() if n % 4 == 1 else None  # [T] or None
        calls.append((n % 2, logits, indices, valid))
    batched = _bank()
    for row, logits, indices, valid in calls:
        batched.begin()
        batched.stage(row, logits, indices, None, None, valid, None, 0, True)
        batched.end()
    sums, counts = _reduced(batched)
    alone = _bank()
    for row, logits, indices, valid in calls:
        alone.begin()
        alone.stage(row, logits, indices, None, None, valid, None, 0, True)
        alone.end()
        _reduced(alone)
    expected_sums, expected_counts = alone.live()
    assert batched.errors.counts() == {} and alone.errors.counts() == {}
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-9, atol=1e-9)
    assert counts[:, 0].sum() == 2 * sum(int(v.sum()) if v is not None else l.shape[0] for _, l, _, v in calls)


@pytest.mark.parametrize("kernel", ["compiled", "numpy"])
@pytest.mark.parametrize("path", ["copied", "held", "arena", "reduced-at-once", "plain"])
def test_an_engines_int32_expert_ids_count_as_int64_ones(path, kernel, monkeypatch):
    """vLLM's routers hand over int32 ids, staged as they are (no cast in the model's graph):
    every way a CPU call is staged and reduced counts them as the same ids in int64."""
    from moewatch.hotpath import numba_backend

    monkeypatch.setattr(numba_backend, "enabled", kernel == "compiled")
    if path == "reduced-at-once":
        monkeypatch.setattr(staged, "MAX_STAGED_BYTES", 64)  # every call over the budget
    tokens = 300 if path == "arena" else 5  # the arena takes prefill-sized calls
    torch.manual_seed(1)
    calls = [(n % 2, torch.randn(tokens, 8), torch.stack([torch.randperm(8)[:2] for _ in range(tokens)]))
             for n in range(6)]  # the router's own choice, not the logits' top-2
    results = []
    for dtype in (torch.int64, torch.int32):
        bank = _bank()
        for row, logits, indices in calls:
            bank.begin()
            if path == "plain":  # the compiled op's commonest call (stage.routing)
                bank.stage_copy(row, logits, indices.to(dtype))
            else:
                bank.stage(row, logits, indices.to(dtype), None, None, None, None, 0, path != "held")
            bank.end()
        results.append(_reduced(bank))
        assert bank.errors.counts() == {}
    (sums64, counts64), (sums32, counts32) = results
    np.testing.assert_array_equal(counts32, counts64)
    np.testing.assert_array_equal(sums32, sums64)
    assert counts64[:, 0].sum() == 2 * tokens * len(calls)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0], ids=["no-drops", "drops-per-call"])
def test_plain_records_reduce_as_each_call_reduced_alone(capacity_factor):
    """The compiled op's commonest call is staged as a plain record (``stage_copy``), and the
    reader makes one Call of a gate's plain records (``_plain_calls``): the sums and counts are
    exactly those of every call staged in full and reduced alone, the would-be drops of a
    capacity factor (counted per call) included. A record of the wrong width is counted as an
    error, and the others still count."""
    torch.manual_seed(2)
    calls = [(n % 2, torch.randn(1 + n % 4, 8), None) for n in range(40)]
    calls = [(row, logits, torch.stack([torch.randperm(8)[:2] for _ in range(logits.shape[0])]).to(torch.int32))
             for row, logits, _ in calls]  # the router's own ids, int32 as vLLM's
    plain = _bank(capacity_factor=capacity_factor)
    for row, logits, indices in calls:
        plain.begin()
        plain.stage_copy(row, logits, indices)
        plain.end()
    assert all(type(record) is tuple and len(record) == 3
               for _, staged_calls, _, _ in plain._committed for record in staged_calls)
    sums, counts = _reduced(plain)
    alone = _bank(capacity_factor=capacity_factor)
    for row, logits, indices in calls:
        alone.begin()
        alone.stage(row, logits, indices, None, None, None, None, 0, True)
        alone.end()
        _reduced(alone)
    expected_sums, expected_counts = alone.live()
    assert plain.errors.counts() == {} and alone.errors.counts() == {}
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-9, atol=1e-9)
    if capacity_factor:
        assert counts[:, 1].sum() > 0  # some calls would drop tokens
    # a record of the wrong width among the plain ones: counted as an error, the others count
    mixed = _bank(capacity_factor=capacity_factor)
    for n, (row, logits, indices) in enumerate(calls):
        mixed.begin()
        mixed.stage_copy(row, torch.randn(logits.shape[0], 6) if n == 7 else logits, indices)
        mixed.end()
    _, mixed_counts = _reduced(mixed)
    assert sum(mixed.errors.counts().values()) == 1
    assert mixed_counts[:, 0].sum() == counts[:, 0].sum() - 2 * calls[7][1].shape[0]


def test_the_compiled_ops_five_argument_overload_stages_the_same_call():
    """``moewatch::stage.routing`` (logits and the router's ids alone: what a vLLM router's call
    compiles to) stages what the full ``stage`` does for the same call."""
    from moewatch.hotpath import ops

    torch.manual_seed(3)
    logits, indices = torch.randn(3, 8), torch.stack([torch.randperm(8)[:2] for _ in range(3)])
    results = []
    for overload in ("routing", "default"):
        bank = _bank()
        bank_id = ops.register(bank)
        try:
            bank.begin()
            if overload == "routing":
                torch.ops.moewatch.stage(logits, indices, bank.token, bank_id, 1)  # resolves to stage.routing
            else:
                torch.ops.moewatch.stage(logits, indices, None, None, None, None, bank.token, bank_id, 1, 0)
            bank.end()
            results.append(_reduced(bank))
        finally:
            ops.unregister(bank_id)
        assert bank.errors.counts() == {}
    (sums, counts), (expected_sums, expected_counts) = results
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(sums, expected_sums)
    assert counts[1, 0].sum() == 6 and counts[0].sum() == 0


def test_a_sampled_gates_plain_records_reach_its_sampler_call_by_call():
    """Where a gate's decisions are sampled (``sample_decisions``), a dump's rows name their
    call and its token in it: its plain records are not merged, each reaches the sampler as the
    call it was, while an unsampled gate's are reduced as one."""
    from moewatch.errors import ErrorLog
    from moewatch.hotpath.layout import SOFTMAX

    class Recording:  # the sampler seam: what DecisionRecorder.record is handed, call by call
        def __init__(self):
            self.calls = []

        def record(self, logits, indices, probs, valid, positions=None):
            self.calls.append((tuple(logits.shape), indices.clone()))

    sampled = Recording()
    gates = [staged.GateParams(f"g{i}", num_experts=8, top_k=2, scoring=SOFTMAX, capacity_factor=0.0)
             for i in range(2)]
    bank = staged.StagedBank(gates, ErrorLog(), sampler_of=lambda row: sampled if row == 0 else None)
    torch.manual_seed(4)
    calls = [(torch.randn(1 + n % 3, 8), torch.stack([torch.randperm(8)[:2] for _ in range(1 + n % 3)]))
             for n in range(10)]
    for logits, indices in calls:
        bank.begin()
        bank.stage_copy(0, logits, indices)
        bank.stage_copy(1, logits, indices)
        bank.end()
    _, counts = _reduced(bank)
    assert [shape for shape, _ in sampled.calls] == [tuple(logits.shape) for logits, _ in calls]
    assert all(torch.equal(got, indices) for (_, got), (_, indices) in zip(sampled.calls, calls))
    np.testing.assert_array_equal(counts[0], counts[1])  # the merged gate counts the same
