"""The hot path alone: what one gate call costs the forward's thread, and the reader, per backend.

For decode-sized calls (T tokens x E experts) of a Mixtral-shaped router (a Linear gate whose
output is (logits, weights, indices)), measured in one run, side by side:

  alone      the router call without moewatch
  staged     moewatch's CPU backend (the default on CPU): the call is recorded, reduced later
  inline     the torch reference computed in the forward (what the device backend does on a
             device without a fused kernel; the previous CPU hot path did the same work)

Per set-up: microseconds per router call on the forward's thread (minimum and median over
repeats), the added microseconds against ``alone``, ATen ops dispatched per call, and for the
staged backend the reader's microseconds per call (the batched reduction, amortised).

    python benchmarks/hotpath.py [--repeats 7] [--calls 2000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moewatch


class Router(nn.Module):
    """A Mixtral-style top-k router: logits, renormalised top-k weights, indices."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.05)
        self.top_k = top_k
        self.num_experts = experts

    def forward(self, x):
        logits = nn.functional.linear(x, self.weight)  # [T, E]
        weights, indices = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), indices


class Model(nn.Module):
    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, x):
        return self.router(x)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def per_call_us(model, x, calls: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - start) / calls * 1e6


def measure(tokens: int, experts: int, top_k: int, hidden: int, calls: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = Model(Router(hidden, experts, top_k)).eval()
    x = torch.randn(tokens, hidden)
    out = {}
    for name in ("alone", "staged", "inline"):
        mon = None
        if name != "alone":
            backend = "staged" if name == "staged" else "device"
            mon = moewatch.attach(model, gates="router", top_k=top_k, background=False, backend=backend,
                                  window_tokens=1 << 40)
        per_call_us(model, x, 50)  # warm up
        if mon is not None:
            mon.counts()
        samples, reader = [], []
        for _ in range(repeats):
            samples.append(per_call_us(model, x, calls))
            if mon is not None:
                start = time.perf_counter()
                mon.counts()  # the reader's work for those calls (drain + reduce)
                reader.append((time.perf_counter() - start) / calls * 1e6)
        with CountOps() as ops, torch.no_grad():
            model(x)
        if mon is not None:
            mon.detach()
        out[name] = dict(min=min(samples), median=statistics.median(samples),
                         reader=statistics.median(reader) if reader else 0.0, ops=ops.count)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"moewatch {moewatch.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
          f"router hidden {args.hidden}; {args.calls} calls x {args.repeats} repeats")
    print(f"{'T':>4}{'E':>5}{'k':>3}  {'set-up':<8}{'min us':>9}{'median':>9}{'added':>9}{'ops':>6}{'reader us':>11}")
    for tokens, experts, top_k in [(1, 8, 2), (8, 8, 2), (64, 8, 2), (8, 64, 8), (64, 64, 8), (8, 128, 8)]:
        res = measure(tokens, experts, top_k, args.hidden, args.calls, args.repeats)
        base = res["alone"]["median"]
        for name, r in res.items():
            added = f"{r['median'] - base:>9.1f}" if name != "alone" else f"{'':>9}"
            reader = f"{r['reader']:>11.1f}" if name == "staged" else f"{'':>11}"
            print(f"{tokens:>4}{experts:>5}{top_k:>3}  {name:<8}{r['min']:>9.1f}{r['median']:>9.1f}{added}"
                  f"{r['ops']:>6}{reader}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
