"""vLLM's real tokens on a device, as CUDA graphs replay them (``VllmEngine._graph_safe_real``).

vLLM captures CUDA graphs by default: a gate kernel captured in a piecewise graph replays with
the address of the mask it was given at capture, and a full graph replays the root hook's
kernels without running its Python. So on a device the mask must be computed by kernels alone,
from vLLM's persistent ``is_padding`` buffer and an armed flag on the device, into a buffer of
fixed address. No GPU here: these tests run the same ops on CPU tensors and check the
properties a replay relies on; the replays themselves are not run.
"""
from __future__ import annotations

import types

import torch

from moewatch.engines.vllm import VllmEngine


def _engine(padding: torch.Tensor) -> VllmEngine:
    engine = VllmEngine()
    context = types.SimpleNamespace(is_padding=padding)
    engine._has_context, engine._get_context = (lambda: True), (lambda: context)
    return engine


def test_a_devices_mask_is_a_view_of_one_buffer_computed_by_kernels_alone():
    """The runner fills its ``is_padding`` buffer in place before each step; the mask is always
    the same buffer's memory, and re-running the one captured op (what a replay does) after the
    runner's fill and after arming gives that step's real tokens."""
    base = torch.zeros(64, dtype=torch.bool)  # the runner's persistent buffer
    engine = _engine(base[:8])
    engine.armed = False  # vLLM's profiling and warm-up runs
    captured = engine._graph_safe_real(base[:8])  # [1, 8], as captured in a warm-up
    assert captured.shape == (1, 8) and not captured.any()
    address = captured.data_ptr()
    assert engine._real_buffer.shape == (64,)  # the whole of is_padding's buffer, once

    engine.armed = True  # after the warm-up: the flag on the device, no new tensor
    base[:8] = torch.tensor([False] * 5 + [True] * 3)  # the step's 5 real tokens, 3 padded
    replayed = engine._graph_safe_real(base[:8])  # the hook's one kernel, as a full graph replays it
    assert replayed.data_ptr() == address
    assert captured.tolist() == [[True] * 5 + [False] * 3]  # what the captured gate kernels read

    base[:16] = torch.arange(16) % 4 == 0  # a bigger step: every fourth token padded
    bigger = engine._graph_safe_real(base[:16])
    assert bigger.data_ptr() == address and engine._real_buffer.shape == (64,)
    assert bigger.tolist() == [[i % 4 != 0 for i in range(16)]]

    engine.armed = False
    assert not engine._graph_safe_real(base[:16]).any()


def test_a_forward_on_a_device_takes_the_graph_safe_mask_and_one_on_the_cpu_does_not():
    """The device path is taken by any forward off the CPU (here the meta device: shapes only);
    a CPU forward keeps the CPU path, which spares a step without padding any op."""
    on_meta = torch.zeros(64, dtype=torch.bool, device="meta")
    engine = _engine(on_meta[:8])
    mask = engine.real_tokens((), {})
    assert mask.device.type == "meta" and mask.shape == (1, 8)
    assert engine._real_buffer is not None and engine._real_buffer.device.type == "meta"

    on_cpu = torch.zeros(64, dtype=torch.bool)
    engine = _engine(on_cpu[:8])
    assert engine.real_tokens((), {}) is None  # no padding: no mask, no op
    on_cpu[6:8] = True
    assert engine.real_tokens((), {}).tolist() == [[True] * 6 + [False] * 2]
    assert engine._real_buffer is None
