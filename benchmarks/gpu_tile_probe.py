"""Fused kernel GPU time per call against the most tokens per block on CUDA: the measurement
behind triton_backend._TILE. Needs a CUDA device and Triton.

    python benchmarks/gpu_tile_probe.py

For each cap (most tokens per block) and call shape: the kernel in a CUDA graph of 100 calls,
GPU microseconds per call (median of 15 replays); "!" marks counts that differ from the first
cap's (they must not).
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from moewatch.hotpath import layout, triton_backend as tb  # noqa: E402

CAPS = (128, 32, 16, 8, 4)


def gpu_us(call, repeats: int = 15) -> float:
    """GPU microseconds per ``call()``: 100 calls captured in a CUDA graph, replayed."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 100)
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available() or not tb.AVAILABLE:
        print("needs a CUDA device and Triton: nothing measured")
        return 2
    device = torch.device("cuda")
    tiles = dict(tb._TILE)
    print(f"GPU us per call (graph of 100), co-selection on, the router's indices; columns: at most {CAPS} "
          "tokens a block")
    try:
        for experts, k in ((8, 2), (64, 8)):
            for tokens in (1, 8, 64, 512, 8192):
                x = torch.randn(tokens, experts, device=device, dtype=torch.bfloat16)  # [T, E]
                idx = torch.topk(x.float(), k).indices  # [T, k]
                sums = torch.zeros(1, layout.NUM_SCALARS + experts, dtype=torch.float64, device=device)
                counts = torch.zeros(1, layout.COUNT_ROWS, experts, dtype=torch.int64, device=device)
                absmax = torch.zeros(1, dtype=torch.float64, device=device)
                cosel = torch.zeros(1, experts, experts, dtype=torch.int64, device=device)

                def call():
                    tb.launch(x, idx, None, None, None, None, None, 0, sums, counts, absmax, 0, k, 0, 0.0, cosel, None)

                row, first = [], None
                for cap in CAPS:
                    tb._TILE["cuda"] = (1024, cap)
                    for acc in (sums, counts, absmax, cosel):
                        acc.zero_()
                    call()
                    got = (counts.clone(), cosel.clone(), sums.clone())
                    first = first or got
                    same = torch.equal(got[0], first[0]) and torch.equal(got[1], first[1]) and torch.allclose(
                        got[2], first[2])
                    row.append(f"{gpu_us(call):6.2f}{'' if same else '!'}")
                print(f"  E={experts:<3} k={k} T={tokens:<5}", " ".join(row), flush=True)
    finally:
        tb._TILE.clear()
        tb._TILE.update(tiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
