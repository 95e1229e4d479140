"""Where a compiled small model's fixed cost per forward goes, with the CPU (staged) backend.

A decode forward of a tiny model does almost nothing, so moewatch's fixed cost per forward
(one registered op per gate call, the root hooks, the recorded calls, the reader) is a visible
share of it. This splits that cost by replacing one part at a time, measured side by side in one
run against the model alone (``tests/moe_from_scratch.py``'s model, ``torch.compile(fullgraph=True)``,
one torch thread):

  plain     the model alone
  full      moewatch attached, as users run it
  dropped   the staged op's body runs, but the forward's calls are dropped before they are
            committed (nothing reaches the reader)
  noop      the staged op's body replaced by nothing (the ops' dispatch and the root hooks remain)

A round times ``--forwards`` forwards of each set-up in turn; per set-up it prints the median
time a forward and the paired difference to ``plain`` (median and inner quartiles over rounds).
Then, with moewatch as users run it, the staged op's body timed inside the forward, and the
reductions of those forwards' calls (wall and CPU time a forward: the reader's, on its own
thread, and what a flush after them finds left).

    python benchmarks/staged_cost.py --rounds 25
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moewatch  # noqa: E402
from moewatch.hotpath import ops  # noqa: E402
from tests.moe_from_scratch import TinyMoELM  # noqa: E402


def _timed(model, ids, forwards: int) -> float:
    start = time.perf_counter()
    for _ in range(forwards):
        model(ids)
    return (time.perf_counter() - start) / forwards * 1e6


def _quartiles(values):
    ordered = sorted(values)
    n = len(ordered)
    return statistics.median(ordered), ordered[n // 4], ordered[(3 * n) // 4]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4, help="tokens a decode forward (a batch of one-token rows)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--forwards", type=int, default=200, help="forwards a set-up times in a round")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    plain = TinyMoELM(d_model=args.hidden).eval()
    watched = TinyMoELM(d_model=args.hidden).eval()
    watched.load_state_dict(plain.state_dict())
    mon = moewatch.attach(watched, gates="blocks.*.router", top_k=2, num_experts=8)
    compiled_plain = torch.compile(plain, fullgraph=True)
    compiled_watched = torch.compile(watched, fullgraph=True)
    ids = torch.randint(0, 64, (args.tokens, 1))
    bank = next(b for b in ops._BANKS.values() if hasattr(b, "stage"))  # the staged bank the op calls
    stage = bank.stage

    def dropped(*call):
        stage(*call)
        bank._thread.pending.clear()

    variants = {"full": stage, "dropped": dropped, "noop": lambda *call: None}
    times = {name: [] for name in ("plain", *variants)}
    with torch.no_grad():
        for _ in range(20):  # compiled, warm
            compiled_plain(ids)
            compiled_watched(ids)
        for _ in range(args.rounds):
            times["plain"].append(_timed(compiled_plain, ids, args.forwards))
            for name, body in variants.items():
                bank.stage = body
                times[name].append(_timed(compiled_watched, ids, args.forwards))
        bank.stage = stage

        print(f"torch {torch.__version__}, hidden {args.hidden}, 2 gates, {args.tokens}-token decode forwards, "
              f"{args.rounds} rounds of {args.forwards}")
        print(f"{'set-up':8s} {'us a forward':>13s}   added to plain, paired: median [inner quartiles]")
        for name, values in times.items():
            line = f"{name:8s} {statistics.median(values):13.1f}"
            if name != "plain":
                median, low, high = _quartiles([v - p for v, p in zip(values, times["plain"])])
                line += f"   {median:6.1f} [{low:.1f}, {high:.1f}]"
            print(line)

        body_times = []

        def timed_stage(*call):
            start = time.perf_counter()
            stage(*call)
            body_times.append(time.perf_counter() - start)

        banks = next(b for b in ops._BANKS.values() if hasattr(b, "take") and not hasattr(b, "stage"))
        take, spent = banks.take, [0.0, 0.0]

        def timed_take(*a, **k):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return take(*a, **k)
            finally:
                spent[0] += time.perf_counter() - wall
                spent[1] += time.thread_time() - cpu

        bank.stage, banks.take = timed_stage, timed_take
        forwards = 5000
        for _ in range(forwards):
            compiled_watched(ids)
        time.sleep(6)  # the reader's last look (moewatch.hotpath.staged.LOOK_SECONDS)
        mon.flush()  # and what it left
        bank.stage, banks.take = stage, take
    print(f"staged op body inside the forward: {statistics.median(body_times) * 1e6:.1f} us a call (median)")
    print(f"reductions (the reader's, and the flush after): {spent[0] / forwards * 1e6:.1f} us wall, "
          f"{spent[1] / forwards * 1e6:.1f} us CPU a forward")
    mon.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
