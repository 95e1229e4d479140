"""GPU checks of the no-host-sync design (issue: core, point 6). Needs a CUDA device.

    python benchmarks/gpu_checks.py

1. sync-free hooks: ``torch.cuda.set_sync_debug_mode("error")`` around monitored forwards of a
   model whose own forward does not sync (a from-scratch MoE), and around the gate calls of a
   transformers Mixtral (its expert dispatch syncs by itself, so only its gates are run there);
2. CUDA graphs: one capture, then 10 replays count exactly 10x one eager forward;
3. torch.compile: a compiled model counts what the eager model counts.
Prints one line per check and exits 1 if any fails.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moewatch  # noqa: E402
from tests.tiny_models import tiny_mixtral  # noqa: E402
from tests.moe_from_scratch import TinyMoELM  # noqa: E402


def _delta(after, before):
    return {k: after[k] - before[k] for k in after}


def check_sync_free(device) -> str:
    torch.manual_seed(0)
    model = TinyMoELM().to(device).eval()
    ids = torch.randint(0, 64, (8, 32), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mon = moewatch.attach(model, gates="*.router", top_k=2, capacity_factor=1.25, sample_decisions=0.25)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # warm-up: lazy allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(ids, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hf = tiny_mixtral().to(device)
    hf_mon = moewatch.attach(hf)
    hidden = torch.randn(64, 64, device=device)
    gate = hf.model.layers[0].mlp.gate
    with torch.no_grad():
        gate(hidden)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gate(hidden)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    errors = {**mon.error_counts(), **hf_mon.error_counts()}
    mon.detach()
    hf_mon.detach()
    assert errors == {}, errors
    return "no host sync in monitored forwards (sync debug mode 'error')"


def check_cuda_graph(device) -> str:
    torch.manual_seed(1)
    model = TinyMoELM().to(device).eval()
    static_ids = torch.randint(0, 64, (4, 16), device=device)
    mon = moewatch.attach(model, gates="*.router", top_k=2, background=False)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            for _ in range(3):
                model(static_ids)
        torch.cuda.current_stream().wait_stream(side)
        before = mon.counts()
        model(static_ids)
        one = _delta(mon.counts(), before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_ids)
        captured = mon.counts()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        replayed = _delta(mon.counts(), captured)
    mon.detach()
    for name in one:
        np.testing.assert_array_equal(replayed[name], 10 * one[name])
    return f"CUDA graph: 10 replays = 10 x one eager forward ({sum(int(v.sum()) for v in one.values())} assignments each)"


def check_compile(device) -> str:
    model = tiny_mixtral(layers=1).to(device)
    ids = torch.randint(0, 128, (2, 16), device=device)
    mon = moewatch.attach(model, background=False)
    with torch.no_grad():
        model(ids)
        eager = mon.counts()
        compiled = torch.compile(model)
        compiled(ids)
    got = _delta(mon.counts(), eager)
    mon.detach()
    for name in eager:
        np.testing.assert_array_equal(got[name], eager[name])
    return "torch.compile (inductor): counts equal eager"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    failed = 0
    for check in (check_sync_free, check_cuda_graph, check_compile):
        try:
            print(f"PASS {check(device)}")
        except Exception as error:  # report every check, then fail
            failed += 1
            print(f"FAIL {check.__name__}: {type(error).__name__}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
