"""The hook path never reads a value back to the host.

Host-sync calls are intercepted during a monitored forward and attributed to moewatch when the
nearest caller outside torch is moewatch code (the model itself may sync as it likes, also when
its gate's forward runs inside moewatch's tap).
"""
import contextlib
import os
import sys

import pytest
import torch

import moewatch
from tests.conftest import padded_batch, tiny_mixtral

PACKAGE_DIR = os.path.dirname(moewatch.__file__)
SYNCING = [(torch.Tensor, n) for n in ("item", "cpu", "tolist", "numpy", "nonzero", "bincount",
                                         "__bool__", "__int__", "__float__")]
SYNCING += [(torch, "nonzero"), (torch, "bincount"), (torch, "argwhere")]


TORCH_DIR = os.path.dirname(torch.__file__)


def _moewatch_on_stack() -> bool:
    """Whether the innermost caller that is not torch's own code (nor this file's tracer) is moewatch's."""
    frame = sys._getframe(2)
    while frame is not None:
        where = frame.f_code.co_filename
        if where.startswith(PACKAGE_DIR):
            return True
        if not where.startswith(TORCH_DIR) and where != __file__:
            return False  # the model's own code (a gate's forward called by the tap included)
        frame = frame.f_back
    return False


@contextlib.contextmanager
def sync_tracer():
    """Yields a list that collects the names of syncing calls made from moewatch code."""
    calls = []
    originals = []

    def wrap(owner, name, fn):
        def traced(*args, **kwargs):
            if _moewatch_on_stack():
                calls.append(name)
            return fn(*args, **kwargs)
        return traced

    def traced_getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items) and _moewatch_on_stack():
            calls.append("boolean-mask indexing")
        return original_getitem(self, index)

    for owner, name in SYNCING:
        fn = getattr(owner, name)
        originals.append((owner, name, owner.__dict__.get(name, None), fn))
        setattr(owner, name, wrap(owner, name, fn))
    original_getitem = torch.Tensor.__getitem__
    torch.Tensor.__getitem__ = traced_getitem
    try:
        yield calls
    finally:
        torch.Tensor.__getitem__ = original_getitem
        for owner, name, own, fn in originals:
            if own is None and owner is torch.Tensor:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


@pytest.mark.parametrize("backend", ["staged", "device"])
def test_monitored_forward_makes_no_host_sync(backend):
    """Both backends: the staged CPU one, and the device one (the reference op per call, as on a GPU)."""
    model = tiny_mixtral()
    ids, mask = padded_batch()
    mon = moewatch.attach(model, background=False, capacity_factor=1.0, backend=backend, sample_decisions=0.5)
    with sync_tracer() as calls, torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids[:, :1], attention_mask=mask)  # decode-shaped call
    assert calls == []
    assert mon.error_counts() == {}
    assert sum(int(c.sum()) for c in mon.counts().values()) > 0
    mon.detach()


def test_tracer_catches_a_sync_in_the_hook_path(monkeypatch):
    """The tracer itself can fail: a hook path that calls .item() is reported."""
    from moewatch.hotpath.staged import StagedBank

    original, original_output = StagedBank.stage, StagedBank.stage_output

    def syncing(bank, row, logits, *args, **kwargs):
        logits.sum().item()
        return original(bank, row, logits, *args, **kwargs)

    def syncing_output(bank, row, output):  # the eager path without grad keeps the output whole
        output[0].sum().item()
        return original_output(bank, row, output)

    monkeypatch.setattr(StagedBank, "stage", syncing)
    monkeypatch.setattr(StagedBank, "stage_output", syncing_output)
    model = tiny_mixtral(layers=1)
    ids, mask = padded_batch()
    mon = moewatch.attach(model, background=False)
    with sync_tracer() as calls, torch.no_grad():
        model(ids, attention_mask=mask)
    mon.detach()
    assert "item" in calls
