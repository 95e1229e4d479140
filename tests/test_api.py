"""The public API: names, the context manager, detach, bad arguments."""
import pytest
import torch

import moewatch
from moewatch.taps import tapped
from tests.conftest import padded_batch, tiny_mixtral


def test_all_is_pinned():
    assert sorted(moewatch.__all__) == sorted([
        "AdapterError", "Baseline", "BaselineError", "GateHealth", "GateInfo", "Health", "Monitor",
        "__version__", "attach",
        "supported_families", "DumpError", "DumpFormatError", "read_dump",
    ])
    for name in moewatch.__all__:
        assert hasattr(moewatch, name), name


def test_monitor_surface(mixtral):
    ids, mask = padded_batch()
    with moewatch.attach(mixtral, background=False) as mon:
        assert [g.name for g in mon.gates] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        assert all(g.num_experts == 8 and g.top_k == 2 and g.family == "mixtral" for g in mon.gates)
        with torch.no_grad():
            mixtral(ids, attention_mask=mask)
        health = mon.flush()
        assert health is mon.health()
        assert health.severity in ("ok", "drift", "collapse")
        frame = mon.windows()
        assert len(frame) == 2 and set(frame["gate"]) == {g.name for g in mon.gates}
        assert set(mon.dropped().values()) == {0}
        assert {k: int(v.sum()) for k, v in mon.counts().items()} == {g.name: 2 * int(mask.sum()) for g in mon.gates}
    assert not mon.attached


def test_outputs_bit_identical_and_detach_leaves_no_hook(mixtral):
    ids, mask = padded_batch()

    def hooks_and_forwards():
        return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.get("forward"))
                for n, m in mixtral.named_modules()}

    before = hooks_and_forwards()
    with torch.no_grad():
        plain = mixtral(ids, attention_mask=mask).logits
    mon = moewatch.attach(mixtral, background=False)
    with torch.no_grad():
        watched = mixtral(ids, attention_mask=mask).logits
    assert torch.equal(plain, watched)
    assert any(tapped(m) for m in mixtral.modules())  # the gates were tapped while attached
    mon.detach()
    assert hooks_and_forwards() == before
    with torch.no_grad():  # no longer counted
        mixtral(ids, attention_mask=mask)
    assert all(int(c.sum()) == 2 * int(mask.sum()) for c in mon.counts().values())


def test_attach_twice_is_a_clear_error(mixtral):
    mon = moewatch.attach(mixtral, background=False)
    with pytest.raises(RuntimeError, match="already attached"):
        moewatch.attach(mixtral)
    mon.detach()
    moewatch.attach(mixtral, background=False).detach()  # fine after detach


def test_model_without_gates_lists_candidates():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with pytest.raises(moewatch.AdapterError, match="found no MoE gate") as info:
        moewatch.attach(model)
    assert "0 (Linear, out=32)" in str(info.value) and "gates=" in str(info.value)


@pytest.mark.parametrize("options, message", [
    ({"window_tokens": -1}, "window_tokens"),
    ({"window_seconds": 0}, "window_seconds"),
    ({"ring_windows": 0}, "ring_windows"),
    ({"scoring": "softermax"}, "scoring"),
    ({"sample_decisions": 2.0}, "sample_decisions"),
    ({"windw_tokens": 5}, "unknown option"),
])
def test_bad_options(mixtral, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        moewatch.attach(mixtral, **options)


def test_unknown_gate_pattern_lists_candidates(mixtral):
    with pytest.raises(moewatch.AdapterError, match="matched no module") as info:
        moewatch.attach(mixtral, gates="model.layers.*.moe.router")
    assert "model.layers.0.mlp.gate" in str(info.value)


def test_windows_close_by_tokens_and_ring_is_bounded():
    model = tiny_mixtral(layers=1)
    ids, mask = padded_batch(batch=2, length=8)
    mask[:] = 1
    with moewatch.attach(model, background=False, window_tokens=16, ring_windows=3) as mon:
        for _ in range(5):
            with torch.no_grad():
                model(ids, attention_mask=mask)
            mon._poll()  # what the reader thread does
        frame = mon.windows()
        assert list(frame["window"]) == [2, 3, 4]  # 5 closed, 3 kept
        assert (frame["tokens"] == 16).all()


def test_background_reader_closes_windows_by_time():
    import time

    model = tiny_mixtral(layers=1)
    ids, mask = padded_batch()
    with moewatch.attach(model, window_seconds=0.2, window_tokens=10**9) as mon:
        with torch.no_grad():
            model(ids, attention_mask=mask)
        deadline = time.monotonic() + 10
        while mon.windows().empty and time.monotonic() < deadline:
            time.sleep(0.05)
        frame = mon.windows()
    assert len(frame) >= 1 and int(frame["tokens"].sum()) == int(mask.sum())


def test_a_listener_may_read_the_monitor_while_windows_close():
    """Listeners run inside the reader's take; reading windows, counts or flushing there returns
    (no deadlock, no nested take) and sees the window it was called for."""
    model = tiny_mixtral(layers=1)
    ids, mask = padded_batch(batch=2, length=8)
    mask[:] = 1
    seen = []
    with moewatch.attach(model, background=False, window_tokens=16) as mon:
        def listener(window, health):
            seen.append((window.index, mon.windows()["window"].max(), int(sum(c.sum() for c in mon.counts().values()))))
            mon.flush()

        mon.add_listener(listener)
        for _ in range(4):
            with torch.no_grad():
                model(ids, attention_mask=mask)
        frame = mon.windows()
        assert mon.error_counts() == {}
    assert [s[0] for s in seen] == [0, 1, 2, 3] and list(frame["window"]) == [0, 1, 2, 3]
    assert all(index == latest for index, latest, _ in seen)  # the window being closed is in the ring
    # counts(): every forward the take under way reduced (4 x 16 tokens x top-2), no nested take
    assert [s[2] for s in seen] == [128] * 4
