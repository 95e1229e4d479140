"""The hot path alone: what one gate call costs the forward's thread, and the reader, per backend.

For decode-sized calls (T tokens x E experts) of a Mixtral-shaped router (a Linear gate whose
output is (logits, weights, indices)), measured in one run, side by side:

  alone      the router call without moewatch
  staged     moewatch's CPU backend (the default on CPU): the call is recorded, reduced later;
             the gate's forward is tapped (moewatch.taps)
  hooked     the same work, observed through a forward hook instead of a tap (what moewatch did
             before taps): the cost of nn.Module.__call__'s hook path
  inline     the torch reference computed in the forward (what the device backend does on a
             device without a fused kernel; the previous CPU hot path did the same work)

Each forward calls G routers (``--gates``; a model's MoE layers without the rest), so the root
module's per-forward hooks are shared by G gate calls as in a real model; G = 1 is the worst case.
Per set-up: microseconds per router call on the forward's thread (minimum and median over
repeats), the added microseconds against ``alone`` (the median and quartiles of round-by-round
differences, each round running every set-up within a fraction of a second, and a 95%
confidence interval of that median), ATen ops dispatched
per call, and for the staged backend the reader's microseconds per call (the batched
reduction, amortised). The default clock is the forward thread's CPU time, which time the
thread spends descheduled (other jobs on a shared machine) does not inflate; ``--clock wall``
measures elapsed time.

    python benchmarks/hotpath.py [--repeats 21] [--calls 1000] [--gates 1 4] [--setups staged hooked]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import moewatch
from paired import median_ci  # benchmarks/paired.py


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
    """A forward that calls ``gates`` routers in turn (a model's MoE layers, without the rest)."""

    def __init__(self, routers):
        super().__init__()
        self.routers = nn.ModuleList(routers)

    def forward(self, x):
        out = None
        for router in self.routers:
            out = router(x)
        return out


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


SETUPS = ("alone", "staged", "hooked", "inline")


def per_call_us(model, x, forwards: int, gates: int, clock=time.thread_time) -> float:
    """Microseconds per gate call over ``forwards`` forwards of ``gates`` calls each, by ``clock``."""
    with torch.no_grad():
        start = clock()
        for _ in range(forwards):
            model(x)
        return (clock() - start) / (forwards * gates) * 1e6


def _observe_through_hooks(model) -> list:
    """Move the monitor's gate observers from their taps to forward hooks (what moewatch used
    before taps): the same work per call, plus nn.Module.__call__'s slow path."""
    handles = []
    for router in model.routers:
        tap = router.__dict__.pop("forward")
        for observer in tap.observers:
            handles.append(router.register_forward_hook(observer, with_kwargs=True))
        tap.observers.clear()
    return handles


def measure(tokens: int, experts: int, top_k: int, hidden: int, gates: int, calls: int, repeats: int,
            setups=SETUPS, clock=time.thread_time) -> dict:
    """The set-ups interleaved round by round (the machine's drift hits them alike)."""
    torch.manual_seed(0)
    model = Model([Router(hidden, experts, top_k) for _ in range(gates)]).eval()
    x = torch.randn(tokens, hidden)
    forwards = max(1, calls // gates)
    samples = {name: [] for name in setups}
    reader, ops = [], {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name in setups:
            mon, hooks = None, []
            if name != "alone":
                backend = "device" if name == "inline" else "staged"
                mon = moewatch.attach(model, gates="routers.*", top_k=top_k, background=False, backend=backend,
                                      window_tokens=1 << 40)
                if name == "hooked":
                    hooks = _observe_through_hooks(model)
            per_call_us(model, x, 20, gates, clock)
            if mon is not None:
                mon.counts()
            took = per_call_us(model, x, forwards, gates, clock)
            if round_:
                samples[name].append(took)
            if mon is not None:
                start = clock()
                mon.counts()  # the reader's work for those calls (drain + reduce)
                if round_ and name == "staged":
                    reader.append((clock() - start) / (forwards * gates) * 1e6)
            if not round_:
                with CountOps() as counter, torch.no_grad():
                    model(x)
                ops[name] = counter.count / gates
            for hook in hooks:
                hook.remove()
            if mon is not None:
                mon.detach()
    alone = samples["alone"]
    result = {}
    for name in setups:
        # added: this set-up minus the router alone, round by round (both ran within ~0.1 s)
        added = sorted(s - a for s, a in zip(samples[name], alone))
        _, ci_lo, ci_hi = median_ci(added)
        result[name] = dict(min=min(samples[name]), median=statistics.median(samples[name]),
                            added=statistics.median(added), added_lo=added[len(added) // 4],
                            added_hi=added[(3 * len(added)) // 4], ci_lo=ci_lo, ci_hi=ci_hi,
                            reader=statistics.median(reader) if name == "staged" else 0.0, ops=ops[name])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gates", type=int, nargs="+", default=[1, 4],
                        help="gate calls per forward (the root's per-forward hooks are shared by them)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS,
                        help="set-ups to run (alone always runs: the others are measured against it)")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="thread: CPU time of the forward's thread (other processes on the machine "
                             "do not count); wall: elapsed time")
    args = parser.parse_args(argv)
    setups = ["alone"] + [s for s in args.setups if s != "alone"]
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"moewatch {moewatch.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
          f"router hidden {args.hidden}; {args.calls} calls x {args.repeats} repeats")
    calibration = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6
    print(f"calibration: python -m timeit 'sum(range(1000))' = {calibration:.1f} us on this machine now")
    print(f"per gate call, {args.clock} clock: us on the forward's thread (min, median over repeats); added vs "
          "alone: median [quartiles] of the round-by-round differences and the median's 95% confidence "
          "interval; ATen ops; reader us")
    print(f"{'G':>3}{'T':>4}{'E':>5}{'k':>3}  {'set-up':<8}{'min us':>9}{'median':>9}{'added':>9}"
          f"{'quartiles':>16}{'95% CI':>16}{'ops':>6}{'reader us':>11}")
    for gates in args.gates:
        for tokens, experts, top_k in [(1, 8, 2), (8, 8, 2), (64, 8, 2), (8, 64, 8), (64, 64, 8), (8, 128, 8)]:
            res = measure(tokens, experts, top_k, args.hidden, gates, args.calls, args.repeats, setups, clock)
            for name, r in res.items():
                if name == "alone":
                    added = f"{'':>9}{'':>16}{'':>16}"
                else:
                    spread = f"[{r['added_lo']:.1f}, {r['added_hi']:.1f}]"
                    ci = f"[{r['ci_lo']:.1f}, {r['ci_hi']:.1f}]"
                    added = f"{r['added']:>9.1f}{spread:>16}{ci:>16}"
                reader = f"{r['reader']:>11.1f}" if name == "staged" else f"{'':>11}"
                print(f"{gates:>3}{tokens:>4}{experts:>5}{top_k:>3}  {name:<8}{r['min']:>9.1f}{r['median']:>9.1f}"
                      f"{added}{r['ops']:>6.0f}{reader}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
