"""What the reader benchmarks share: two ways of one reader step, timed side by side.

``reader_join.py`` (the join of a window's calls) and ``reader_kernel.py`` (the reduction's
compiled kernel against numpy) each compare two ways, the first named the new one; these print
their medians with minimum and maximum and the median of the round-by-round ratio, and time the
reduction of whole windows in a monitored model.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import moewatch


def arguments(doc: str, model_help: str, rounds_help: str, argv=None) -> argparse.Namespace:
    """The options both benchmarks take: --repeats (of the step alone), --model, --rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--model", action="store_true", help=model_help)
    parser.add_argument("--rounds", type=int, default=10, help=rounds_help)
    return parser.parse_args(argv)


def summary(label: str, times: Dict[str, List[float]], unit: float, unit_name: str) -> None:
    """One line: each way's median [min, max] (seconds times ``unit``) and the median
    [min, max] of the round-by-round ratio of the first way to the second."""
    (new, first), (old, second) = times.items()
    ratios = [a / b for a, b in zip(first, second)]
    print(f"  {label:38s} {new} {statistics.median(first) * unit:8.1f} [{min(first) * unit:.1f}, "
          f"{max(first) * unit:.1f}]   {old} {statistics.median(second) * unit:8.1f} [{min(second) * unit:.1f}, "
          f"{max(second) * unit:.1f}] {unit_name}   {new} / {old} {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}]")


def in_a_model(label: str, model, ids: torch.Tensor, window_forwards: int, rounds: int,
               ways: Dict[str, Callable[[], None]]) -> None:
    """``model`` monitored without a reader thread, so that a window's whole reduction runs in
    ``flush`` on this thread: per round and way (``ways``: name -> what switches to it, in an
    order that alternates round by round), one window's forwards of ``ids``, then the flush's
    CPU time a forward. Prints the summary and each way's share of a forward."""
    monitor = moewatch.attach(model, background=False, window_tokens=window_forwards * ids.numel())
    times = {name: [] for name in ways}
    forward_seconds = []
    with torch.no_grad():
        model(ids)
        monitor.flush()
        for round_index in range(rounds):
            for name in (list(ways) if round_index % 2 == 0 else list(ways)[::-1]):
                ways[name]()
                started = time.perf_counter()
                for _ in range(window_forwards):
                    model(ids)
                forward_seconds.append((time.perf_counter() - started) / window_forwards)
                started = time.thread_time()
                monitor.flush()
                times[name].append((time.thread_time() - started) / window_forwards)
    next(iter(ways.values()))()  # the new way stays
    errors = monitor.error_counts()
    monitor.detach()
    assert not errors, errors
    forward = statistics.median(forward_seconds)
    print(f"\n{label}: a forward {forward * 1e3:.1f} ms (median); the reduction's CPU a forward, "
          f"median [min, max] over {rounds} rounds, us:")
    summary("reduction a forward", times, 1e6, "us")
    for name, values in times.items():
        print(f"  {name}: {statistics.median(values) / forward * 100:.3f}% of a forward")
