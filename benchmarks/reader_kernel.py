"""The CPU reader's reduction with the compiled kernel and with numpy alone, side by side.

The reader reduces a window's gate calls to the accumulators' sums
(``numpy_backend.segment_sums``). Its float statistics are made by one compiled pass
(``numba_backend``) where numba is installed, by some thirty numpy ops otherwise. This times
both, interleaved, switched by ``numba_backend.enabled``:

- without a model: a reduction of S gates' tokens in one pass (the reader's merged reduction,
  co-selection on, the logits expert-major as the reader lays them out), decode and prefill
  sizes, narrow and wide routers, with and without padding, ``--repeats`` times each;
- with ``--model``: the Mixtral-shaped model of ``overhead.py`` (hidden 1024, 4 layers, 8
  experts, top-2) at prefill 4 x 128 and at decode batch 8, and an OLMoE-shaped one (hidden
  512, 4 layers, 64 experts, top-8) at prefill 4 x 512, each monitored without a reader
  thread, so that a window's whole reduction runs in ``flush`` on this thread: per round, one
  window's forwards, then the flush's CPU time, the kernel switched round by round.

It prints each way's median with its minimum and maximum, and the median of the round-by-round
ratio (compiled against numpy alone).

    python benchmarks/reader_kernel.py              # the reductions alone, about 30 s
    python benchmarks/reader_kernel.py --model      # and in models, about 3 min
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moewatch.hotpath import numba_backend, numpy_backend  # noqa: E402
from reader_ab import arguments, in_a_model, summary  # noqa: E402  (benchmarks/reader_ab.py)

# (label, gates, tokens a gate, experts, top-k, padded, scoring): what one of the reader's reductions sees
SHAPES = [
    ("decode, Mixtral, batch 8", 4, 8, 8, 2, False, "softmax"),
    ("decode, Mixtral, 16 steps of batch 8", 4, 128, 8, 2, False, "softmax"),
    ("decode, padded", 4, 128, 8, 2, True, "softmax"),
    ("decode, OLMoE, 16 steps of batch 8", 4, 128, 64, 8, False, "softmax"),
    ("decode, sigmoid, 256 experts, top-8", 4, 128, 256, 8, False, "sigmoid"),
    ("prefill, Mixtral, 4 x 512", 4, 2048, 8, 2, False, "softmax"),
    ("prefill, Mixtral, padded", 4, 2048, 8, 2, True, "softmax"),
    ("prefill, OLMoE, 4 x 512", 4, 2048, 64, 8, False, "softmax"),
    ("prefill, 128 experts, top-8", 4, 1024, 128, 8, False, "softmax"),
    ("prefill, sigmoid, 256 experts, top-8", 4, 512, 256, 8, False, "sigmoid"),
]
WAYS = ("compiled", "numpy")


def switch(way: str) -> None:
    numba_backend.enabled = way == "compiled"


SWITCHES = {way: (lambda way=way: switch(way)) for way in WAYS}


def reductions_alone(repeats: int) -> None:
    print(f"one reduction of S gates' tokens, one thread; median [min, max] over {repeats} repeats, us:")
    rng = np.random.default_rng(0)
    for label, gates, tokens, experts, top_k, padded, scoring in SHAPES:
        total = gates * tokens
        logits = (2 * rng.standard_normal((experts, total))).astype(np.float32)  # [E, T] as the reader joins
        indices = np.argsort(-logits.T, axis=1)[:, :top_k].astype(np.int64)  # [T, k]
        valid = (rng.random(total) < 0.8).astype(np.float64) if padded else None  # [T]
        args = dict(logits=logits, indices=indices, valid=valid, scoring=scoring, top_k=top_k, coselect=True,
                    starts=np.arange(gates) * tokens, expert_major=True)
        results = {}
        for way in WAYS:
            switch(way)
            results[way] = numpy_backend.segment_sums(**args)
        for got, want in zip(results["compiled"], results["numpy"]):  # the same sums, to float tolerance
            assert np.array_equal(got.counts, want.counts) and np.array_equal(got.cosel, want.cosel)
            assert np.allclose(got.scalars, want.scalars, rtol=1e-5, atol=1e-3)
        times = {way: [] for way in WAYS}
        loops = max(1, 20000 // total)
        for _ in range(repeats):
            for way in WAYS:
                switch(way)
                started = time.perf_counter()
                for _ in range(loops):
                    numpy_backend.segment_sums(**args)
                times[way].append((time.perf_counter() - started) / loops)
        summary(f"{label} ({gates} x [{tokens}, {experts}])", times, 1e6, "us")
    switch("compiled")


def in_models(rounds: int) -> None:
    from overhead import mixtral_shaped  # benchmarks/overhead.py
    from transformers import OlmoeConfig, OlmoeForCausalLM

    generator = torch.Generator().manual_seed(0)
    mixtral = mixtral_shaped(1024, 4, 8, 2, 8192)
    in_a_model("Mixtral-shaped (hidden 1024, 4 layers, 8 experts, top-2), prefill 4 x 128", mixtral,
               torch.randint(0, 8192, (4, 128), generator=generator), 4, rounds, SWITCHES)
    in_a_model("Mixtral-shaped, decode batch 8 (one-token forwards)", mixtral,
               torch.randint(0, 8192, (8, 1), generator=generator), 64, rounds, SWITCHES)
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=8192, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=2048, eos_token_id=0)
    in_a_model("OLMoE-shaped (hidden 512, 4 layers, 64 experts, top-8), prefill 4 x 512",
               OlmoeForCausalLM(config).eval(), torch.randint(0, 8192, (4, 512), generator=generator), 4, rounds,
               SWITCHES)


def main(argv=None) -> int:
    args = arguments(__doc__, "also the reduction in models", "rounds of --model, each way", argv)
    if not numba_backend.available():
        print("numba is not installed (or cannot compile the kernel): nothing to compare")
        return 1
    reductions_alone(args.repeats)
    if args.model:
        in_models(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
