"""CPU time of the staged (CPU) backend's own code per forward, without a model.

A decode step of a served engine on a CPU hands moewatch one root forward with its step's
requests and one compiled gate call per MoE layer. This replays that pattern straight into a
monitor's hot path, with nothing else running: ``--forwards`` forwards, each the root forward's
begin (with a step of ``--requests`` requests of ``--request-tokens`` tokens each: 1 for decode,
more for prefill, whose calls of 256 tokens or more go through the arena), one
``moewatch::stage`` op call per
gate (through the dispatcher, as compiled code calls it: logits [T, E] and the router's indices
[T, k], copied), and the end; then one take of the reader, which reduces them. It prints the
thread CPU time a forward of each side (the forward's thread, the reader's take), median and
minimum over ``--rounds`` rounds, and checks that every token was counted.

    python benchmarks/staged_calls.py --rounds 30
    python benchmarks/staged_calls.py --rounds 30 --requests 2 --request-tokens 128
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moewatch  # noqa: E402
from moewatch.hotpath.requests import RequestTokens  # noqa: E402
from tests.moe_from_scratch import TinyMoELM  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="requests a step")
    parser.add_argument("--request-tokens", type=int, default=1,
                        help="tokens of each request in a step (1: decode; T = requests x this)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--forwards", type=int, default=512, help="forwards a round, then one take")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyMoELM(d_model=64).eval()  # 2 gates of 8 experts, top-2: only its gates' names are used
    mon = moewatch.attach(model, gates="blocks.*.router", top_k=2, num_experts=8, background=False)
    banks = mon._banks
    bank = banks.banks[0]
    tokens, experts = args.requests * args.request_tokens, 8
    logits = torch.randn(tokens, experts)  # [T, E]
    indices = torch.topk(logits, 2).indices  # [T, k]
    stage = torch.ops.moewatch.stage.default
    step = {f"request-{i}": args.request_tokens for i in range(args.requests)}

    def forward() -> None:
        banks.begin(None, None, RequestTokens.of_step(step))
        for row in range(len(mon.gates)):
            stage(logits, indices, None, None, None, None, bank.token, bank.bank_id, row, 0)
        banks.end()

    forward_us, reader_us = [], []
    for _ in range(args.rounds):
        gc.collect()
        started = time.thread_time()
        for _ in range(args.forwards):
            forward()
        staged = time.thread_time()
        banks.take(False, lambda *cut: None, hold=False)
        forward_us.append((staged - started) / args.forwards * 1e6)
        reader_us.append((time.thread_time() - staged) / args.forwards * 1e6)
    counts = mon.counts()
    mon.detach()
    expected = args.rounds * args.forwards * tokens * 2
    assert all(int(c.sum()) == expected for c in counts.values()), (counts, expected)
    print(f"torch {torch.__version__}; {len(counts)} gates, {tokens}-token steps, {args.rounds} rounds of "
          f"{args.forwards} forwards; every assignment counted ({expected:,} a gate)")
    print(f"{'side':<16} {'median us/forward':>18} {'min':>8}")
    for side, values in (("forward's thread", forward_us), ("reader's take", reader_us)):
        print(f"{side:<16} {statistics.median(values):>18.2f} {min(values):>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
