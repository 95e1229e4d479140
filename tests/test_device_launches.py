"""What a monitored forward launches on a device: one kernel per gate call, one at the forward's end.

On a GPU, every op that moewatch dispatched beside its kernels would be one more launch in each
decode step. Here the device bank runs on CPU tensors with its CUDA path switched on (the fused
observe and the fused forward end), and the two Triton kernels are recorded instead of run (their
host code runs as on a GPU: argument checks, views, the cached scratch). A dispatch mode counts
the ATen ops of a forward alone and monitored: what moewatch adds must be metadata only (views,
detach: no kernel on any device), and the launches exactly one per gate call plus one.
What the kernels compute is tested apart (tests/test_triton_kernel.py, tests/test_triton_forward_end.py).
"""
from __future__ import annotations

import collections
import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moewatch
from tests.moe_from_scratch import TinyMoELM
from tests.test_triton_hopper_build import Recorder
from tests.tiny_models import tiny_mixtral

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# ops that only make a new view of existing memory: no kernel on any device
METADATA_OPS = {"aten.view.default", "aten.view.dtype", "aten.detach.default", "aten._unsafe_view.default",
                "aten.alias.default", "aten.as_strided.default", "aten.slice.Tensor", "aten.select.int",
                "aten.t.default", "aten.transpose.int", "aten.unsqueeze.default", "aten.squeeze.dim",
                "aten.expand.default", "aten.reshape.default", "aten.flatten.using_ints"}


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_of(run) -> collections.Counter:
    with torch.no_grad(), AtenOps() as mode:
        run()
    return mode.ops


@pytest.mark.parametrize("which", ["from-scratch, padding mask, capacity", "mixtral decode", "mixtral prefill"])
def test_a_monitored_forward_adds_one_launch_per_gate_call_and_one_at_its_end(monkeypatch, which):
    from moewatch.hotpath import triton_backend, triton_forward_end

    torch.manual_seed(0)
    if which.startswith("from-scratch"):
        model = TinyMoELM().eval()
        ids = torch.randint(0, 64, (4, 16))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        run = lambda: model(ids, attention_mask=mask)  # noqa: E731
        options = dict(gates="*.router", top_k=2, capacity_factor=1.25)
    else:
        model = tiny_mixtral(layers=3)
        ids = torch.randint(0, 128, (8, 1) if "decode" in which else (2, 24))
        run = lambda: model(ids)  # noqa: E731
        options = {}
    run()
    alone = _ops_of(run)
    observe, end = Recorder(), Recorder()
    monkeypatch.setattr(triton_backend, "_kernel", observe)
    monkeypatch.setattr(triton_forward_end, "_forward_end_kernel", end)
    with moewatch.attach(model, background=False, backend="device", **options) as mon:
        for bank in mon._banks.banks:  # the CUDA path, on CPU tensors
            bank._fused, bank._fused_end = triton_backend.launch, triton_forward_end.forward_end
        run()  # warm-up: the cached scratch is allocated once
        observe.launches.clear()
        end.launches.clear()
        watched = _ops_of(run)
        launches = (len(observe.launches), len(end.launches))  # (detaching cuts a last window: one more end)
        gates, errors = len(mon.gates), mon.error_counts()
    added = watched - alone
    assert errors == {}
    assert launches == (gates, 1)
    assert set(added) <= METADATA_OPS, f"ops that would launch kernels: {dict(added)}"
    assert not (alone - watched), "the model's own ops changed"


def test_a_gate_wider_than_the_kernel_takes_the_reference_on_the_device_and_counts_exactly(monkeypatch):
    """The kernel takes up to FUSED_MAX_EXPERTS experts; a wider gate (Kimi-K2 has 384) is
    counted by the torch reference on the device, not refused at every call."""
    from moewatch.hotpath import triton_backend, triton_forward_end
    from moewatch.hotpath.layout import FUSED_MAX_EXPERTS

    torch.manual_seed(0)
    experts = FUSED_MAX_EXPERTS + 64
    model = TinyMoELM(layers=1, num_experts=experts).eval()
    ids = torch.randint(0, 64, (2, 12))
    observe = Recorder()
    monkeypatch.setattr(triton_backend, "_kernel", observe)
    monkeypatch.setattr(triton_forward_end, "_forward_end_kernel", Recorder())
    with moewatch.attach(model, background=False, backend="device", gates="*.router", top_k=2) as mon:
        for bank in mon._banks.banks:  # the CUDA path, on CPU tensors
            bank._fused, bank._fused_end = triton_backend.launch, triton_forward_end.forward_end
        with torch.no_grad():
            model(ids)
        counts, errors = mon.counts(), mon.error_counts()
    assert errors == {}
    assert observe.launches == []
    (assigned,) = counts.values()
    assert assigned.shape == (experts,) and int(assigned.sum()) == 2 * ids.numel()


@pytest.mark.parametrize("tokens,capacity_factor,block_t,shared_drops", [
    (64, 0.0, 4, False),  # at most 4 tokens a block on CUDA (measured fastest, docs/performance.md)
    (64, 1.25, 64, False),  # would-be drops at decode sizes: one program, no shared scratch
    (300, 1.25, 128, True),  # past 128 tokens: several programs, the scratch's ticket
])
def test_cuda_blocks_take_4_tokens_except_decode_sized_calls_with_would_be_drops(
        monkeypatch, tokens, capacity_factor, block_t, shared_drops):
    from moewatch.hotpath import layout, triton_backend

    experts = 8
    recorder = Recorder()
    monkeypatch.setattr(triton_backend, "_kernel", recorder)
    monkeypatch.setitem(triton_backend._TILE, "cpu", triton_backend._TILE["cuda"])  # CUDA's tiles, on CPU tensors
    logits = torch.randn(tokens, experts)
    sums = torch.zeros(1, layout.NUM_SCALARS + experts, dtype=torch.float64)
    counts = torch.zeros(1, layout.COUNT_ROWS, experts, dtype=torch.int64)
    triton_backend.launch(logits, None, None, None, None, None, None, 0, sums, counts,
                          torch.zeros(1, dtype=torch.float64), 0, 2, 0, capacity_factor)
    ((_, kwargs),) = recorder.launches
    assert (kwargs["BLOCK_T"], kwargs["SHARED_DROPS"]) == (block_t, shared_drops)
