"""GPU checks of the hot path. Needs a CUDA device (and Triton for the fused kernel).

    python benchmarks/gpu_checks.py            # checks, then the overhead table
    python benchmarks/gpu_checks.py --checks   # checks only

1. sync-free hooks: ``torch.cuda.set_sync_debug_mode("error")`` around monitored forwards of a
   model whose own forward does not sync (a from-scratch MoE), and around the gate calls of a
   transformers Mixtral (its expert dispatch syncs by itself, so only its gates are run there);
2. CUDA graphs: one capture, then 10 replays count exactly 10x one eager forward;
3. torch.compile: a compiled model counts what the eager model counts;
4. torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs through inductor) counts
   exactly;
5. one kernel per gate call: the profiler sees exactly one launch of the fused kernel per gate
   call of a forward;
6. co-selection and tokens per rank on CUDA (expert placement): the kernel's counts equal the
   numpy reference from the same indices (random shapes, padding, k up to 8), and after a CUDA
   graph capture 10 replays add exactly 10x one forward's co-selection;
then the fused kernel's time per gate call with and without the placement statistics, and an overhead table: a Mixtral-shaped model in bf16, forwards of B tokens (decode-shaped, B =
1, 8, 64) and a prefill, eager and CUDA-graph replays, with and without moewatch, medians of
interleaved rounds with their min-max ratio. Targets: <= 3% eager, <= 1% with CUDA graphs.
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


def check_reduce_overhead(device) -> str:
    model = tiny_mixtral(layers=2).to(device)
    ids = torch.randint(0, 128, (4, 16), device=device)
    mon = moewatch.attach(model, background=False)
    with torch.no_grad():
        model(ids)
        eager = mon.counts()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(5):  # warm-up runs, then recorded CUDA graphs replay
            compiled(ids)
        torch.cuda.synchronize()
    got = _delta(mon.counts(), eager)
    mon.detach()
    torch._dynamo.reset()
    for name in eager:
        np.testing.assert_array_equal(got[name], 5 * eager[name])
    return "torch.compile(mode='reduce-overhead', fullgraph=True): 5 calls = 5 x eager counts"


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


def placement_cost_table(device, repeats: int = 50) -> None:
    """Fused kernel time per gate call without and with the placement statistics (CUDA events)."""
    from moewatch.hotpath import layout, triton_backend

    if not triton_backend.AVAILABLE:
        return
    print("\nfused kernel per gate call, microseconds (median of "
          f"{repeats}): without / with co-selection / with co-selection and tokens per rank")
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
            for _ in range(5):
                call()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            row.append(float(np.median(times)))
        print(f"  T={tokens:<5} E={experts:<4} k={k}: " + " / ".join(f"{t:.1f}" for t in row))


def overhead_table(device, repeats: int = 7) -> None:
    import statistics
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    from overhead import mixtral_shaped

    model = mixtral_shaped(1024, 4, 8, 2, 8192, dtype=torch.bfloat16).to(device)
    print("\noverhead, Mixtral-shaped hidden 1024, 4 layers, 8 experts, top-2, bf16 "
          f"(median of {repeats} interleaved rounds; min-max of the per-round ratio)")
    print(f"  {'workload':<22}{'mode':<8}{'alone ms':>10}{'moewatch ms':>13}{'ratio':>8}{'range':>15}")
    for label, shape in [("decode-shaped B=1", (1, 1)), ("decode-shaped B=8", (8, 1)),
                         ("decode-shaped B=64", (64, 1)), ("prefill 8 x 512", (8, 512))]:
        ids = torch.randint(0, 8192, shape, device=device)
        for mode in ("eager", "graphs"):
            times = {"alone": [], "moewatch": []}
            for _ in range(repeats + 1):
                for setup in ("alone", "moewatch"):
                    mon = moewatch.attach(model, background=False) if setup == "moewatch" else None
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
                        for _ in range(20):
                            run()
                        torch.cuda.synchronize()
                        times[setup].append((time.perf_counter() - start) / 20)
                    if mon is not None:
                        mon.detach()
            alone, watched = times["alone"][1:], times["moewatch"][1:]
            ratios = [w / a for w, a in zip(watched, alone)]
            print(f"  {label:<22}{mode:<8}{statistics.median(alone) * 1e3:>10.3f}"
                  f"{statistics.median(watched) * 1e3:>13.3f}{statistics.median(watched) / statistics.median(alone):>8.3f}"
                  f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>15}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    failed = 0
    for check in (check_sync_free, check_cuda_graph, check_compile, check_reduce_overhead,
                  check_one_kernel_per_gate_call, check_placement_statistics):
        try:
            print(f"PASS {check(device)}")
        except Exception as error:  # report every check, then fail
            failed += 1
            print(f"FAIL {check.__name__}: {type(error).__name__}: {error}")
    if "--checks" not in sys.argv:
        placement_cost_table(device)
        overhead_table(device)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
