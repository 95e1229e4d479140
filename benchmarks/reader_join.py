"""The CPU reader's join of a window's calls into the expert-major layout, side by side.

Before its reduction the reader joins a window's gate calls (logits [T_i, E] each) into one
float32 array [E, sum T_i] (``numpy_backend.concat_experts``). It used to join the calls
token-major and then make numpy's transposing copy of the whole array, which thrashes the
cache for wide routers; it now copies each call's transposed blocks of tokens straight into
their columns. This times both, interleaved, on the calls a reader joins:

- without a model: arena copies (numpy arrays, prefill-sized calls) and tensors (decode-sized
  or held calls) of narrow and wide routers, ``--repeats`` times each;
- with ``--model``: an OLMoE-shaped model (hidden 512, 4 layers, 64 experts, top-8, float32)
  at prefill (batch 4 x 512 tokens), monitored without a reader thread, so that all of a
  window's reduction runs in ``flush`` on this thread: per round, one window's forwards, then
  the flush's CPU time, the join switched between the two ways round by round.

It prints each way's median time with its minimum and maximum, and the median of the
round-by-round ratio (this version against the whole copy).

    python benchmarks/reader_join.py                # the joins alone, about 20 s
    python benchmarks/reader_join.py --model        # and the reduction in a model, about 2 min
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moewatch.hotpath import numpy_backend, staged  # noqa: E402
from reader_ab import arguments, in_a_model, summary  # noqa: E402  (benchmarks/reader_ab.py)

# (kind, calls, tokens a call, experts): what a window's join sees
SHAPES = [
    ("arrays", 64, 512, 8),  # a Mixtral-shaped prefill window: 16 forwards of 4 gates
    ("arrays", 8, 2048, 64),  # OLMoE / Qwen-MoE widths
    ("arrays", 16, 1024, 128),
    ("tensors", 16, 512, 64),  # held calls (grad on, or the arena full)
    ("tensors", 1024, 4, 64),  # decode steps
    ("tensors", 1024, 1, 8),
]


def whole_copy(tensors) -> np.ndarray:
    """The previous join: token-major, then numpy's transposing copy of the whole array."""
    return np.ascontiguousarray(numpy_backend.concat(tensors).T)


JOINS = {"blocks": numpy_backend.concat_experts, "whole": whole_copy}


def joins_alone(repeats: int) -> None:
    print(f"the join alone, one thread; median [min, max] over {repeats} repeats, us:")
    generator = torch.Generator().manual_seed(0)
    for kind, calls, tokens, experts in SHAPES:
        members = [torch.randn(tokens, experts, generator=generator) for _ in range(calls)]
        if kind == "arrays":
            members = [member.numpy() for member in members]
        assert np.array_equal(JOINS["blocks"](members), JOINS["whole"](members))
        times = {name: [] for name in JOINS}
        loops = max(1, 2000 // calls)
        for _ in range(repeats):
            for name, join in JOINS.items():
                started = time.perf_counter()
                for _ in range(loops):
                    join(members)
                times[name].append((time.perf_counter() - started) / loops)
        summary(f"{kind} {calls} x [{tokens}, {experts}]", times, 1e6, "us")


def olmoe_prefill(rounds: int) -> None:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=8192, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=2048, eos_token_id=0)
    model = OlmoeForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (4, 512))

    def way(join):
        def switch():
            staged.concat_experts = join  # the reader's join, by the name it calls
        return switch
    in_a_model("OLMoE-shaped (hidden 512, 4 layers, 64 experts, top-8), prefill 4 x 512", model, ids, 4, rounds,
               {name: way(join) for name, join in JOINS.items()})


def main(argv=None) -> int:
    args = arguments(__doc__, "also the reduction in an OLMoE-shaped model", "rounds of --model", argv)
    joins_alone(args.repeats)
    if args.model:
        olmoe_prefill(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
