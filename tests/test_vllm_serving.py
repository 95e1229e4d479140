"""What vLLM's serving does to the tokens moewatch counts: the prefix cache and preemption.

vLLM serves with its prefix cache on: a prompt token whose KV blocks are found in the cache is
never run through the model, so never routed. And when the KV cache runs out, its scheduler
preempts requests and later recomputes them: their tokens run through the model again, and are
routed again. moewatch counts routing, so it must count neither the cache hits nor less than
the recomputation: exactly the tokens the engine ran (docs/vllm.md, "What is counted").

One engine (the tiny Mixtral, compilation on, the prefix cache on, as vLLM defaults; a KV cache
of 16 blocks of 32 tokens), three batches one after another: a prompt with a 96-token prefix,
then another with the same prefix (a cache hit), then 8 requests that need twice the cache
(preempted, then recomputed). Beside it the same engine without moewatch: the same outputs.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, with_and_without_moewatch, with_and_without_runs

pytestmark = pytest.mark.timeout(1500)

PREFIX = list(range(100, 196))  # 96 tokens: 3 blocks of 32
FIRST = [PREFIX + [1, 2, 3, 4, 5, 6, 7, 8]]
SAME_PREFIX = [PREFIX + [9, 10, 11, 12, 13, 14, 15, 16]]
# 8 requests of 24 + 100 tokens: 4 blocks each, 32 in all, twice the cache
CROWD = [[(7 * i + j) % 250 + 1 for j in range(24)] for i in range(8)]
MAX_TOKENS = 100
BLOCK = 32
KV_CACHE_BYTES = 16 * BLOCK * 512  # 16 blocks; a token's keys and values: 2 layers x 2 x 32 floats


def _run(model_dir: str, moewatch: bool, core: int) -> dict:
    config = {"model": model_dir, "eager": False, "multiprocess": False, "moewatch": moewatch,
              "port": free_ports(1), "max_tokens": MAX_TOKENS, "ignore_eos": True, "prompts": FIRST,
              "then": [SAME_PREFIX, CROWD], "prefix_caching": True, "block_size": BLOCK,
              "kv_cache_bytes": KV_CACHE_BYTES, "options": {"MOEWATCH_WINDOW_TOKENS": "256"}}
    return engine_result(config, core)


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    return with_and_without_runs(_run, "serving")


@pytest.fixture(scope="module")
def serving_runs():
    return with_and_without_moewatch(engine_runs_to_queue())


def test_the_engine_hit_its_prefix_cache_and_preempted_requests(serving_runs):
    """The situation the other tests need, from the scheduler's own account."""
    (worker,) = serving_runs["on"]["workers"]
    assert worker["prefix_cached"] == len(PREFIX)  # the second prompt's prefix came from the cache
    assert worker["preempted"] > 0


def test_counts_are_the_tokens_the_engine_ran_neither_cache_hits_nor_less_than_recomputed(serving_runs):
    (worker,) = serving_runs["on"]["workers"]
    assert worker["errors"] == {} and worker["monitoring"] == "ok"
    ran = worker["scheduled_tokens"]  # every step's scheduled tokens, recomputation included
    for gate, mine, engine in zip(worker["gates"], worker["counts"].values(), worker["recorded"].values()):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
        assert sum(mine) == gate["top_k"] * ran
    prompts = FIRST + SAME_PREFIX + CROWD
    once = sum(len(p) for p in prompts) + len(prompts) * (MAX_TOKENS - 1)  # each token run once
    # cache hits run fewer tokens than once each, recomputation more: what the preempted
    # requests ran again outweighs the hit here (counting each token once would be wrong)
    assert ran > once - worker["prefix_cached"]


def test_outputs_under_preemption_are_those_without_moewatch(serving_runs):
    assert serving_runs["on"]["outputs"] == serving_runs["off"]["outputs"]
    assert len(serving_runs["on"]["outputs"]) == 10
    assert all(len(tokens) == MAX_TOKENS for tokens in serving_runs["on"]["outputs"])
