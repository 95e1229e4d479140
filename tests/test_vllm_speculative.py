"""Speculative decoding: the draft tokens a step verifies are routed, so they are counted.

With speculative decoding on, each decode step runs the target model on a request's next token
and on the tokens a proposer drafted after it; the forward routes all of them, accepted or not.
moewatch counts routing, so its counts must be exactly what the engine's routers chose for every
token the steps scheduled, drafts included (docs/vllm.md, "What is counted").

One engine with vLLM's n-gram proposer (no draft model: it drafts from the prompt's own
repeats), compilation on, repetitive prompts so that it proposes; beside it the same engine
without moewatch: the same outputs.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, with_and_without_moewatch, with_and_without_runs

pytestmark = pytest.mark.timeout(1500)

# repeats the n-gram proposer finds its drafts in, and one prompt without a short repeat
PROMPTS = [[5, 6, 7, 8] * 6, [9, 10, 11] * 8, [(3 * j) % 40 + 1 for j in range(24)]]
MAX_TOKENS = 40
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}


def _run(model_dir: str, moewatch: bool, core: int) -> dict:
    config = {"model": model_dir, "eager": False, "multiprocess": False, "moewatch": moewatch,
              "port": free_ports(1), "max_tokens": MAX_TOKENS, "ignore_eos": True, "prompts": PROMPTS,
              "speculative": SPECULATIVE}
    return engine_result(config, core)


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    return with_and_without_runs(_run, "speculative")


@pytest.fixture(scope="module")
def speculative_runs():
    return with_and_without_moewatch(engine_runs_to_queue())


def test_draft_tokens_are_counted_as_the_engine_routed_them(speculative_runs):
    (worker,) = speculative_runs["on"]["workers"]
    assert worker["draft_tokens"] > 0  # the proposer drafted: the situation under test
    assert worker["errors"] == {} and worker["monitoring"] == "ok"
    ran = worker["scheduled_tokens"]  # every step's scheduled tokens: drafts included
    without_drafts = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
    assert ran > without_drafts  # some drafts were rejected: routed, yet not in any output
    for gate, mine, engine in zip(worker["gates"], worker["counts"].values(), worker["recorded"].values()):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
        assert sum(mine) == gate["top_k"] * ran


def test_outputs_with_speculative_decoding_are_those_without_moewatch(speculative_runs):
    assert speculative_runs["on"]["outputs"] == speculative_runs["off"]["outputs"]
    assert [len(tokens) for tokens in speculative_runs["on"]["outputs"]] == [MAX_TOKENS] * len(PROMPTS)
