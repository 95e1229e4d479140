"""The forward end's Triton kernel (CUDA's one launch per forward) against its torch ops, on the CPU.

Triton's interpreter must be on before triton is imported (see tests/test_triton_kernel.py), so
the comparison runs in a child process started with ``TRITON_INTERPRET=1``. Two device banks
start from the same random state; each step gives both the same forward (its token rows, the
tokens its gates routed, the reader's request to cut) and ends it, one with the torch ops
(``DeviceBank.end_with_torch``), one with the kernel. Every tensor of both banks must then be
EQUAL: the kernel does the same float64 arithmetic in the same order, on integer-valued rows.
Steps cover: no cut, a cut by tokens, a cut asked for by the reader (with and without traffic),
rows that continue and rows that start, a forward without rows, more cuts than ring slots (the
slot wraps), and gate counts that are not a power of two. Then a whole monitor with both
kernels switched on (interpreted) must count and cut the windows that its torch path does.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the child runs this file as a script
    sys.path.insert(0, str(ROOT))

from moewatch.errors import ErrorLog  # noqa: E402
from moewatch.hotpath.device import CUT_SLOTS, DeviceBank  # noqa: E402
from moewatch.hotpath.layout import NUM_SCALARS, TOKENS  # noqa: E402
from moewatch.hotpath.staged import GateParams  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

STATE = ("sums", "counts", "absmax", "rows", "_row_run", "base_tokens", "force", "cut_ptr", "cut_sums",
         "cut_counts", "cut_absmax", "cut_rows")


def make_bank(num_gates: int, experts: int, window_tokens: int, device: str = "cpu") -> DeviceBank:
    gates = [GateParams(f"g{i}", experts, 2, 0, 0.0) for i in range(num_gates)]
    return DeviceBank(gates, torch.device(device), ErrorLog(), window_tokens)


def state(bank: DeviceBank) -> dict:
    out = {name: getattr(bank, name).clone() for name in STATE}
    out["runs"] = bank._request_runs.runs.clone()
    return out


def compare(num_gates: int, experts: int, steps: int, seed: int, window: int, device: str = "cpu") -> dict:
    """Run ``steps`` forwards through a torch bank and a kernel bank on ``device`` (the CPU under
    the interpreter; CUDA compiled, from benchmarks/gpu_checks.py); the first difference, if any."""
    from moewatch.hotpath import triton_forward_end

    g = torch.Generator().manual_seed(seed)
    torch_bank, kernel_bank = (make_bank(num_gates, experts, window, device),
                               make_bank(num_gates, experts, window, device))
    for bank in (torch_bank, kernel_bank):  # the same random start: sums, counts, absmax, runs
        gen = torch.Generator().manual_seed(seed + 1)
        bank.sums.copy_(torch.randint(0, 50, bank.sums.shape, generator=gen).double())
        bank.counts.copy_(torch.randint(0, 50, bank.counts.shape, generator=gen))
        bank.absmax.copy_(torch.rand(bank.absmax.shape, generator=gen, dtype=torch.float64))
        bank._request_runs.runs.copy_(torch.randint(0, 9, bank._request_runs.runs.shape, generator=gen).double())
    cuts = 0
    for step in range(steps):
        routed = (torch.randint(0, 3, (num_gates,), generator=g).double()
                  * float(torch.randint(0, 2, (1,), generator=g))).to(device)
        force = int(torch.rand(1, generator=g) < 0.2)
        kind = int(torch.randint(0, 3, (1,), generator=g))  # 0: no rows, 1: new rows, 2: continued rows
        batch, length = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        for bank in (torch_bank, kernel_bank):
            bank.begin(None, None if kind == 0 else (batch, length, kind == 2))
            bank.sums[:, TOKENS] += routed  # what the gates' ops added
            bank.sums[:, NUM_SCALARS:] += routed[:, None]
            bank.counts[:, 0] += routed[:, None].long()
            bank.absmax.copy_(torch.maximum(bank.absmax, routed / 10))
            bank.force.fill_(force)
        torch_bank.end_with_torch(torch_bank.take_rows())
        triton_forward_end.forward_end(kernel_bank, kernel_bank.take_rows())
        want, got = ({k: v.cpu() for k, v in state(b).items()} for b in (torch_bank, kernel_bank))
        for name in want:
            if not torch.equal(want[name], got[name]):
                return dict(ok=False, detail=f"step {step}: {name} differs: {got[name].flatten()[:8].tolist()} "
                                              f"vs {want[name].flatten()[:8].tolist()}")
        cuts = int(want["cut_ptr"][0])
    return dict(ok=True, cuts=cuts, detail="")


def compare_monitors() -> dict:
    """A whole monitor on the CUDA path (both kernels, interpreted on CPU tensors) against the same
    monitor on the torch path: 6 forwards with a padding mask and capacity drops, a window per
    64 tokens. Counts, and every window's tokens, counts and rows, must be equal."""
    import numpy as np

    import moewatch
    from moewatch.hotpath import triton_backend, triton_forward_end
    from tests.moe_from_scratch import TinyMoELM

    torch.manual_seed(0)
    model = TinyMoELM().eval()
    ids = torch.randint(0, 64, (4, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    results = []
    for fused in (False, True):
        mon = moewatch.attach(model, gates="*.router", top_k=2, backend="device", background=False,
                              capacity_factor=1.25, window_tokens=64, window_seconds=3600.0)
        if fused:
            for bank in mon._banks.banks:
                bank._fused, bank._fused_end = triton_backend.launch, triton_forward_end.forward_end
        with torch.no_grad():
            for step in range(6):
                model(ids[: 1 + step % 4], attention_mask=mask[: 1 + step % 4])
        mon.flush()
        results.append((mon.counts(), list(mon._ring), mon.error_counts()))
        mon.detach()
    (want, want_windows, _), (got, got_windows, errors) = results
    if errors:
        return dict(ok=False, detail=f"errors {errors}")
    if len(got_windows) != len(want_windows):
        return dict(ok=False, detail=f"{len(got_windows)} windows, want {len(want_windows)}")
    for name in want:
        if not np.array_equal(got[name], want[name]):
            return dict(ok=False, detail=f"counts of {name}: {got[name]} vs {want[name]}")
    for i, (g, w) in enumerate(zip(got_windows, want_windows)):
        # counts, max |logit|, rows and tokens exact; the float sums as tests/test_triton_kernel.py bounds them
        exact = all(np.array_equal(a, b) for a, b in ((g.counts, w.counts), (g.absmax, w.absmax),
                                                         (g.rows, w.rows), (g.tokens, w.tokens)))
        if not exact or not np.allclose(g.sums, w.sums, rtol=1e-5, atol=1e-6 * float(w.tokens.max())):
            return dict(ok=False, detail=f"window {i}: {g} vs {w}")
    return dict(ok=True, detail="", windows=len(got_windows))


# (gates, experts, forwards, seed, window_tokens)
CASES = [(1, 8, 40, 1, 7), (3, 60, 40, 2, 20), (4, 8, 160, 3, 2), (5, 256, 30, 4, 5), (17, 64, 30, 5, 11)]


def child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the child needs TRITON_INTERPRET=1 before triton loads"
    for case in CASES:
        try:
            result = compare(*case)
        except Exception as error:  # report and go on
            result = dict(ok=False, detail=f"{type(error).__name__}: {error}")
        result["case"] = list(case)
        print("CASE " + json.dumps(result), flush=True)
    try:
        result = compare_monitors()
    except Exception as error:
        result = dict(ok=False, detail=f"{type(error).__name__}: {error}")
    print("MONITORS " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            rec = json.loads(line[5:])
            results[tuple(rec["case"])] = rec
        elif line.startswith("MONITORS "):
            results["monitors"] = json.loads(line[9:])
    results["_stderr"] = proc.stderr[-4000:]
    return results


@pytest.mark.parametrize("case", CASES, ids=[f"G{c[0]}-E{c[1]}-{c[2]}steps-window{c[4]}" for c in CASES])
def test_kernel_equals_the_torch_ops(interpreted, case):
    assert case in interpreted, f"the child did not report {case}:\n{interpreted['_stderr']}"
    result = interpreted[case]
    assert result["ok"], result["detail"]


def test_a_monitor_on_the_kernels_counts_and_cuts_what_the_torch_ops_do(interpreted):
    assert "monitors" in interpreted, interpreted["_stderr"]
    result = interpreted["monitors"]
    assert result["ok"], result["detail"]
    assert result["windows"] == 3  # forwards of 16, 32, 48 | 64 | 16, 32 tokens (a flush cuts the last)


def test_the_ring_wraps(interpreted):
    # the 160-step case cuts more windows than the ring has slots, so the slot index wraps
    result = interpreted[(4, 8, 160, 3, 2)]
    assert result["ok"], result["detail"]
    assert result["cuts"] > CUT_SLOTS


if __name__ == "__main__" and "--child" in sys.argv:
    child_main()
