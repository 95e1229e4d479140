"""GPU checks of the hot path. Needs a CUDA device (and Triton for the fused kernels).

    python benchmarks/gpu_checks.py            # checks, then the timings
    python benchmarks/gpu_checks.py --checks   # checks only

1. the fused kernel, compiled, equals the readable reference on every case of
   tests/test_triton_kernel.py (CI runs those cases under Triton's interpreter only), with the
   test's tolerances;
2. the forward end's kernel equals its torch ops (tests/test_triton_forward_end.py), compiled;
3. sync-free hooks: ``torch.cuda.set_sync_debug_mode("error")`` around monitored forwards of a
   model whose own forward does not sync (a from-scratch MoE), and around the gate calls of a
   transformers Mixtral;
4. CUDA graphs: one capture, then 10 replays count exactly 10x one eager forward (and its token
   rows), and with window_tokens = one forward's tokens every forward and replay cuts one window
   holding the same tokens on every gate (windows never split a forward);
5. torch.compile(fullgraph=True): a compiled model counts what the eager model counts, in one
   graph, with no hook error;
6. torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs through inductor) counts
   exactly (a from-scratch MoE); a transformers Mixtral is tried alone and watched, and watched
   may fail only as it fails alone; and with a padding mask that changes between replays, each
   call counts its own real tokens;
7. one kernel per gate call: the profiler sees exactly one launch of the fused kernel per gate
   call of a forward;
8. every kernel moewatch adds to a forward, alone against watched: the gate calls plus one
   forward end, and none of the model's own kernels removed;
9. co-selection and tokens per rank on CUDA (expert placement): the kernel's counts equal the
   numpy reference from the same indices (random shapes, padding, k up to 8), and after a CUDA
   graph capture 10 replays add exactly 10x one forward's co-selection;
then the timings: the forward end alone (torch ops against its one launch, eager and in a CUDA
graph), the fused kernel's GPU time per gate call (in a CUDA graph) with and without the
placement statistics, and
an overhead table: a Mixtral-shaped model in bf16, forwards of B tokens (decode-shaped, B = 1,
8, 64) and a prefill, eager and CUDA-graph replays, the model alone against moewatch (and
against moewatch with its forward end in torch ops), medians of interleaved rounds with the
min-max of the per-round ratio. Targets: <= 3% eager, <= 1% with CUDA graphs.
Prints one line per check and exits 1 if any fails.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))  # the other benchmarks' helpers

import moewatch  # noqa: E402
from tests.tiny_models import tiny_mixtral  # noqa: E402
from tests.moe_from_scratch import TinyMoELM  # noqa: E402


def _delta(after, before):
    return {k: after[k] - before[k] for k in after}


def _one_forward_and_ten_replays(model, static_ids, read):
    """What ``read()`` (a monitor's cumulative counts) adds over one eager forward, and over ten
    replays of a CUDA graph captured from the same forward."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            for _ in range(3):
                model(static_ids)
        torch.cuda.current_stream().wait_stream(side)
        before = read()
        model(static_ids)
        one = _delta(read(), before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_ids)
        captured = read()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        return one, _delta(read(), captured)


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
    one, replayed = _one_forward_and_ten_replays(model, static_ids, mon.counts)
    # the forward's token rows (Window.rows): scalar ops the capture records with the shape
    rows_one, rows_replayed = _one_forward_and_ten_replays(
        model, static_ids, lambda: {"rows": mon._banks.banks[0].rows_total()})
    mon.detach()
    for name in one:
        np.testing.assert_array_equal(replayed[name], 10 * one[name])
    np.testing.assert_array_equal(rows_one["rows"], [4 * 16, 4 * 16 * 16])
    np.testing.assert_array_equal(rows_replayed["rows"], 10 * rows_one["rows"])
    return (f"CUDA graph: 10 replays = 10 x one eager forward ({sum(int(v.sum()) for v in one.values())} "
            "assignments each, and the forward's token rows)")


def check_windows_under_graphs(device) -> str:
    """Windows cut at forward ends on the device: with window_tokens one forward's tokens, every
    forward cuts one window, CUDA-graph replays too, and each holds the same tokens on every gate."""
    torch.manual_seed(5)
    model = TinyMoELM().to(device).eval()
    static_ids = torch.randint(0, 64, (4, 16), device=device)
    mon = moewatch.attach(model, gates="*.router", top_k=2, background=False, window_tokens=4 * 16,
                          window_seconds=3600.0)
    _one_forward_and_ten_replays(model, static_ids, mon.counts)  # 3 warm-ups, 1 forward, 10 replays
    mon.flush()
    tokens = [np.asarray(window.tokens).tolist() for window in mon._ring]
    mon.detach()
    assert len(tokens) == 14, f"{len(tokens)} windows for 14 forwards: {tokens}"
    assert all(row == [64.0] * len(row) for row in tokens), tokens
    return "CUDA graph: one window per forward (replays included), 64 tokens on every gate in each"


def _compiled_counts(model, ids, options, calls: int = 1, **compile_options):
    """(one eager forward's counts, what ``calls`` calls of the model compiled with
    ``fullgraph=True`` and ``compile_options`` add, graphs compiled, errors) for ``model`` watched."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    mon = moewatch.attach(model, background=False, **options)
    try:
        with torch.no_grad():
            model(ids)
            eager = mon.counts()
            compiled = torch.compile(model, fullgraph=True, **compile_options)
            for _ in range(calls):  # with reduce-overhead: warm-up runs, then recorded CUDA graphs replay
                compiled(ids)
            torch.cuda.synchronize()
        return eager, _delta(mon.counts(), eager), counters["stats"]["unique_graphs"] - graphs_before, \
            mon.error_counts()
    finally:
        mon.detach()
        torch._dynamo.reset()


def check_compile(device) -> str:
    model = tiny_mixtral(layers=1).to(device)
    eager, got, graphs, errors = _compiled_counts(model, torch.randint(0, 128, (2, 16), device=device), {})
    assert graphs == 1, f"{graphs} graphs compiled, not one"
    assert errors == {}, errors  # a hook error (say, in the forward's rows) would not show in the counts
    for name in eager:
        np.testing.assert_array_equal(got[name], eager[name])
    return "torch.compile(fullgraph=True) (inductor): counts equal eager"


def _failure(run) -> str:
    """'' when ``run()`` succeeds, else the error with the last frames of its traceback."""
    import traceback

    try:
        run()
        return ""
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)[-6:]
        return f"{type(error).__name__}: {error} at " + " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno}({f.name})" for f in reversed(frames))


def check_reduce_overhead(device) -> str:
    """mode='reduce-overhead' (CUDA graphs through inductor): a from-scratch MoE watched counts
    exactly 5x one eager forward over 5 calls; a transformers Mixtral is tried alone and watched,
    and watched may fail only where it fails alone (the model's own code, not moewatch's)."""
    torch.manual_seed(6)
    scratch = TinyMoELM().to(device).eval()
    eager, got, graphs, errors = _compiled_counts(scratch, torch.randint(0, 64, (4, 16), device=device),
                                                  dict(gates="*.router", top_k=2), 5, mode="reduce-overhead")
    assert graphs == 1, f"{graphs} graphs compiled, not one"
    assert errors == {}, errors  # a hook error (say, in the forward's rows) would not show in the counts
    for name in eager:
        np.testing.assert_array_equal(got[name], 5 * eager[name])
    model = tiny_mixtral(layers=2).to(device)
    ids = torch.randint(0, 128, (4, 16), device=device)

    def alone():
        with torch.no_grad():
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            for _ in range(5):
                compiled(ids)
            torch.cuda.synchronize()
        torch._dynamo.reset()

    def watched():
        eager, got, _, errors = _compiled_counts(model, ids, {}, 5, mode="reduce-overhead")
        assert errors == {}, errors
        for name in eager:
            np.testing.assert_array_equal(got[name], 5 * eager[name])

    failed_alone, failed_watched = _failure(alone), _failure(watched)
    torch._dynamo.reset()
    mixtral = ("Mixtral: alone and watched run, 5 calls = 5 x eager counts" if not failed_alone + failed_watched
               else f"Mixtral alone: {failed_alone or 'runs'}; watched: {failed_watched or 'runs, counts exact'}")
    assert not failed_watched or failed_alone, mixtral
    return f"torch.compile(mode='reduce-overhead', fullgraph=True): from-scratch MoE 5 calls = 5 x eager counts; {mixtral}"


def check_reduce_overhead_with_padding(device) -> str:
    """mode='reduce-overhead' with a padding mask that changes from call to call (same shapes,
    so the recorded CUDA graph replays): each call counts its own real tokens, as eager forwards
    of the same inputs do. The mask reaches the gate ops through the root hook, which runs
    outside the compiled graph: a replay must not read the mask of the recording call."""
    torch.manual_seed(7)
    model = TinyMoELM().to(device).eval()
    ids = torch.randint(0, 64, (4, 16), device=device)
    masks = []
    for call in range(6):
        mask = torch.ones_like(ids)
        mask[call % 4, : 2 + 2 * call] = 0  # another row and width of left padding each call
        masks.append(mask)
    options = dict(gates="*.router", top_k=2, background=False)
    with torch.no_grad():
        with moewatch.attach(model, **options) as mon:
            for mask in masks:
                model(ids, attention_mask=mask)
            eager = mon.counts()
        mon = moewatch.attach(model, **options)
        try:
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            for mask in masks:
                compiled(ids, attention_mask=mask)
            torch.cuda.synchronize()
            got, errors = mon.counts(), mon.error_counts()
        finally:
            mon.detach()
            torch._dynamo.reset()
    assert errors == {}, errors
    for name in eager:
        np.testing.assert_array_equal(got[name], eager[name], err_msg=name)
    return "torch.compile(mode='reduce-overhead'), a padding mask changing between replays: counts equal eager"


def check_one_kernel_per_gate_call(device) -> str:
    from moewatch.hotpath import triton_backend

    if not triton_backend.AVAILABLE:
        raise RuntimeError("Triton is not installed: the torch reference runs instead of the fused kernel")
    torch.manual_seed(2)
    model = TinyMoELM().to(device).eval()
    ids = torch.randint(0, 64, (8, 32), device=device)
    mon = moewatch.attach(model, gates="*.router", top_k=2, capacity_factor=1.25, background=False)
    with torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(ids)
            torch.cuda.synchronize()
    gates = len(mon.gates)
    mon.detach()
    launches = sum(e.count for e in prof.key_averages() if "_observe_kernel" in e.key)
    assert launches == gates, f"{launches} fused-kernel launches for {gates} gate calls"
    return f"one fused kernel per gate call ({launches} launches for {gates} gates)"


def check_kernel_matches_reference(device) -> str:
    """The compiled kernel (on CI it runs under Triton's interpreter only) on every case of
    tests/test_triton_kernel.py, with the same tolerances."""
    from moewatch.hotpath import triton_backend as tb
    from tests import test_triton_kernel as cases

    if not tb.AVAILABLE:
        raise RuntimeError("Triton is not installed")
    kernel, failed, worst = tb._kernel, [], 0.0
    try:
        for name in cases.CASES:
            try:
                result = cases.run_case(name, tb, device=str(device))
            except Exception as error:  # report every case
                result = dict(ok=False, detail=f"{type(error).__name__}: {error}", worst=None)
            if not result["ok"]:
                failed.append(f"{name}: {result['detail']}")
            elif result["worst"] is not None:
                worst = max(worst, result["worst"])
    finally:
        tb._kernel = kernel  # run_case counts launches through a wrapper
    assert not failed, f"{len(failed)} of {len(cases.CASES)} cases: " + " | ".join(failed[:4])
    return (f"compiled kernel equals the reference on all {len(cases.CASES)} cases "
            f"(worst float error {worst:.3f} of the test's bound)")


def check_forward_end_kernel(device) -> str:
    """The forward end's one launch against its torch ops, compiled, as tests/test_triton_forward_end.py."""
    from tests import test_triton_forward_end as cases

    for case in cases.CASES:
        result = cases.compare(*case, device=str(device))
        assert result["ok"], f"{case}: {result['detail']}"
    return f"forward-end kernel equals its torch ops on {len(cases.CASES)} cases"


def _cuda_kernels(run) -> "collections.Counter":
    """Names of the CUDA kernels (and memsets, memcopies) that ``run()`` launches, counted."""
    import collections

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            names[event.name] += 1
    return names


def check_kernels_added(device) -> str:
    """What moewatch adds to a forward's kernels: one per gate call, plus one at the forward's end."""
    lines = []
    torch.manual_seed(4)
    scratch = TinyMoELM().to(device).eval()
    scratch_ids = torch.randint(0, 64, (8, 32), device=device)
    mixtral = tiny_mixtral(layers=2).to(device).to(torch.bfloat16)
    mixtral_ids = torch.randint(0, 128, (4, 1), device=device)
    for label, model, ids, kw in (("from-scratch MoE", scratch, scratch_ids, dict(gates="*.router", top_k=2)),
                                  ("Mixtral bf16 decode", mixtral, mixtral_ids, {})):
        with torch.no_grad():
            model(ids)
            alone = _cuda_kernels(lambda: model(ids))
            mon = moewatch.attach(model, background=False, **kw)
            model(ids)
            watched = _cuda_kernels(lambda: model(ids))
            gates = len(mon.gates)
            mon.detach()
        added, removed = watched - alone, alone - watched
        total = sum(added.values())
        lines.append(f"{label}: {sum(alone.values())} kernels alone, {sum(watched.values())} watched, "
                     f"{total} added for {gates} gate calls + 1 forward end: {dict(added)}"
                     + (f"; fewer: {dict(removed)}" if removed else ""))
        assert not removed, lines[-1]
        assert total == gates + 1, lines[-1]
    return "kernels added per forward = gate calls + 1 (the forward end)\n    " + "\n    ".join(lines)


def check_placement_statistics(device) -> str:
    from moewatch.hotpath import layout, triton_backend
    from tests.coselection_numpy import numpy_coselection, numpy_rank_tokens

    if not triton_backend.AVAILABLE:
        raise RuntimeError("Triton is not installed: the torch reference runs instead of the fused kernel")
    g = torch.Generator().manual_seed(3)
    cases = 0
    for tokens, experts, k in [(1, 8, 2), (7, 60, 6), (300, 64, 8), (8191, 256, 8), (4096, 8, 2)]:
        x = torch.randn(tokens, experts, generator=g)
        idx = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :k]  # [T, k]
        valid = torch.rand(tokens, generator=g) < 0.8  # [T] padding excluded
        ranks = torch.randint(0, max(1, experts // 4), (2, experts), generator=g)  # [G, E]
        sums = torch.zeros(2, layout.NUM_SCALARS + experts, dtype=torch.float64, device=device)
        counts = torch.zeros(2, layout.COUNT_ROWS, experts, dtype=torch.int64, device=device)
        absmax = torch.zeros(2, dtype=torch.float64, device=device)
        cosel = torch.zeros(2, experts, experts, dtype=torch.int64, device=device)
        triton_backend.observe(x.to(device), idx.to(device), None, None, valid.to(device), None, None, 0, sums,
                               counts, absmax, 1, k, 0, 0.0, cosel=cosel, ranks=ranks.to(device))
        torch.cuda.synchronize()
        np.testing.assert_array_equal(layout.symmetric(cosel[1].cpu().numpy()),
                                      numpy_coselection(idx.numpy(), valid.numpy(), experts))
        np.testing.assert_array_equal(counts[1, layout.RANK_TOKENS].cpu().numpy(),
                                      numpy_rank_tokens(idx.numpy(), valid.numpy(), ranks[1].numpy()))
        cases += 1
    torch.manual_seed(1)
    model = TinyMoELM().to(device).eval()
    static_ids = torch.randint(0, 64, (4, 16), device=device)
    mon = moewatch.attach(model, gates="*.router", top_k=2, background=False, expert_placement="contiguous:2")
    one, replayed = _one_forward_and_ten_replays(model, static_ids, mon.coselection)
    mon.detach()
    for name in one:
        np.testing.assert_array_equal(replayed[name], 10 * one[name])
    return f"co-selection and tokens per rank equal numpy ({cases} kernel cases); 10 graph replays = 10 x one forward"


def placement_cost_table(device, repeats: int = 20) -> None:
    """Fused kernel GPU time per gate call without and with the placement statistics: 100 calls
    captured in a CUDA graph, replayed, timed by CUDA events (the host's launch cost left out;
    ``gpu_launch_cost.py`` measures that)."""
    from gpu_tile_probe import gpu_us
    from moewatch.hotpath import layout, triton_backend

    if not triton_backend.AVAILABLE:
        return
    print("\nfused kernel per gate call, GPU microseconds in a CUDA graph (median of "
          f"{repeats} replays of 100 calls): without / with co-selection / with co-selection and tokens per rank")
    for tokens, experts, k in [(1, 8, 2), (64, 8, 2), (64, 256, 8), (8192, 8, 2), (8192, 256, 8)]:
        x = torch.randn(tokens, experts, device=device, dtype=torch.bfloat16)
        idx = torch.topk(x.float(), k).indices
        sums = torch.zeros(1, layout.NUM_SCALARS + experts, dtype=torch.float64, device=device)
        counts = torch.zeros(1, layout.COUNT_ROWS, experts, dtype=torch.int64, device=device)
        absmax = torch.zeros(1, dtype=torch.float64, device=device)
        cosel = torch.zeros(1, experts, experts, dtype=torch.int64, device=device)
        ranks = (torch.arange(experts, device=device) * 4 // experts).reshape(1, experts)
        row = []
        for kw in ({}, {"cosel": cosel}, {"cosel": cosel, "ranks": ranks}):
            call = lambda: triton_backend.observe(x, idx, None, None, None, None, None, 0, sums, counts,  # noqa: E731
                                                  absmax, 0, k, 0, 0.0, **kw)
            row.append(gpu_us(call, repeats))
        print(f"  T={tokens:<5} E={experts:<4} k={k}: " + " / ".join(f"{t:.2f}" for t in row))


def forward_end_cost(device, repeats: int = 200) -> None:
    """The forward end alone, microseconds per forward: torch ops vs the one launch, called from
    Python (eager) and replayed in a CUDA graph (100 ends per graph)."""
    from tests.test_triton_forward_end import make_bank
    from moewatch.hotpath import triton_forward_end

    print("\nforward end per forward, microseconds (median of "
          f"{repeats}): torch ops / one launch, eager; torch ops / one launch, CUDA graph")
    for gates, experts in [(4, 8), (32, 64), (58, 256)]:
        row = []
        for mode in ("eager", "graph"):
            for fused in (False, True):
                bank = make_bank(gates, experts, 1 << 40, str(device))
                end = (lambda: triton_forward_end.forward_end(bank, (8, 8, 16, 1, True))) if fused else \
                    (lambda: bank.end_with_torch((8, 8, 16, 1, True)))
                for _ in range(3):
                    end()
                torch.cuda.synchronize()
                run, per = end, 1
                if mode == "graph":
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for _ in range(100):
                            end()
                    run, per = graph.replay, 100
                times = []
                for _ in range(repeats // per + 20 if per > 1 else repeats):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) / per * 1e6)
                row.append(float(np.median(times)))
        print(f"  G={gates:<3} E={experts:<4}: {row[0]:.1f} / {row[1]:.1f}; {row[2]:.1f} / {row[3]:.1f}")


def overhead_table(device, repeats: int = 7) -> None:
    import statistics

    from overhead import mixtral_shaped

    model = mixtral_shaped(1024, 4, 8, 2, 8192, dtype=torch.bfloat16).to(device)
    print("\noverhead, Mixtral-shaped hidden 1024, 4 layers, 8 experts, top-2, bf16 "
          f"(median of {repeats} interleaved rounds; min-max of the per-round ratio)")
    print(f"  {'workload':<22}{'mode':<8}{'alone ms':>10}{'moewatch ms':>13}{'ratio':>8}{'range':>15}"
          f"{'torch-ops end':>15}")
    for label, shape in [("decode-shaped B=1", (1, 1)), ("decode-shaped B=8", (8, 1)),
                         ("decode-shaped B=64", (64, 1)), ("prefill 8 x 512", (8, 512))]:
        ids = torch.randint(0, 8192, shape, device=device)
        for mode in ("eager", "graphs"):
            times = {"alone": [], "moewatch": [], "torch end": []}
            for _ in range(repeats + 1):
                for setup in times:
                    mon = moewatch.attach(model, background=False) if setup != "alone" else None
                    if setup == "torch end":  # the forward end in torch ops, as before its kernel
                        for bank in mon._banks.banks:
                            bank._fused_end = None
                    with torch.no_grad():
                        run = lambda: model(ids)  # noqa: E731
                        if mode == "graphs":
                            side = torch.cuda.Stream()
                            side.wait_stream(torch.cuda.current_stream())
                            with torch.cuda.stream(side):
                                for _ in range(3):
                                    model(ids)
                            torch.cuda.current_stream().wait_stream(side)
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                model(ids)
                            run = graph.replay
                        for _ in range(3):
                            run()
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        for _ in range(50):
                            run()
                        torch.cuda.synchronize()
                        times[setup].append((time.perf_counter() - start) / 50)
                    if mon is not None:
                        mon.detach()
            alone, watched, torch_end = times["alone"][1:], times["moewatch"][1:], times["torch end"][1:]
            ratios = [w / a for w, a in zip(watched, alone)]
            print(f"  {label:<22}{mode:<8}{statistics.median(alone) * 1e3:>10.3f}"
                  f"{statistics.median(watched) * 1e3:>13.3f}{statistics.median(watched) / statistics.median(alone):>8.3f}"
                  f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>15}"
                  f"{statistics.median(torch_end) / statistics.median(alone):>15.3f}", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    failed = 0
    for check in (check_kernel_matches_reference, check_forward_end_kernel, check_sync_free, check_cuda_graph,
                  check_windows_under_graphs, check_compile, check_reduce_overhead,
                  check_reduce_overhead_with_padding, check_one_kernel_per_gate_call, check_kernels_added,
                  check_placement_statistics):
        start = time.perf_counter()
        try:
            print(f"PASS {check(device)}", end="")
        except Exception as error:  # report every check, then fail
            failed += 1
            print(f"FAIL {check.__name__}: {type(error).__name__}: {error}", end="")
        print(f"  [{time.perf_counter() - start:.1f} s]", flush=True)
    if "--checks" not in sys.argv:
        for table in (forward_end_cost, placement_cost_table, overhead_table):
            try:
                table(device)
            except Exception as error:  # the other tables still run
                failed += 1
                print(f"FAIL {table.__name__}: {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
