"""Requests as a server sees them: parallel sampling (n > 1) and clients that go away.

A server adds requests to vLLM's engine and steps it; a request asking for ``n`` samples becomes
``n`` sequences in the engine, and a client that disconnects has its request aborted mid-way (its
KV blocks freed, its tokens so far already run). moewatch counts routing, so it must count
exactly the tokens the engine ran, the aborted requests' included, and each window's requests
as the scheduler ran them (docs/vllm.md, "What is counted").

One engine (the tiny Mixtral, compilation on, the prefix cache on, as vLLM defaults), six
requests of two seeded samples each, stepped by hand; after three steps two of them are aborted.
Beside it the same engine without moewatch: the same samples.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, with_and_without_moewatch, with_and_without_runs

pytestmark = pytest.mark.timeout(1200)

PROMPTS = [[(13 * i + j) % 250 + 1 for j in range(6 + 5 * i)] for i in range(6)]
ABORTED = (1, 4)
AFTER_STEPS = 3
MAX_TOKENS = 24
SAMPLES = 2


def _run(model_dir: str, moewatch: bool, core: int) -> dict:
    config = {"model": model_dir, "eager": False, "multiprocess": False, "moewatch": moewatch,
              "port": free_ports(1), "max_tokens": MAX_TOKENS, "ignore_eos": True, "prompts": PROMPTS,
              "n": SAMPLES, "temperature": 1.0, "seed": 1234, "prefix_caching": True,
              "abort": {"after_steps": AFTER_STEPS, "indices": list(ABORTED)},
              "options": {"MOEWATCH_WINDOW_TOKENS": "64"}}
    return engine_result(config, core)


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    return with_and_without_runs(_run, "lifecycle")


@pytest.fixture(scope="module")
def lifecycle_runs():
    return with_and_without_moewatch(engine_runs_to_queue())


def test_the_engine_sampled_in_parallel_and_dropped_the_aborted_requests(lifecycle_runs):
    """The situation the other tests need, from the engine's own outputs."""
    outputs = lifecycle_runs["on"]["outputs"]
    for index, samples in enumerate(outputs):
        if index in ABORTED:
            assert samples is None  # aborted before it finished: no final output
        else:
            assert len(samples) == SAMPLES and all(len(tokens) == MAX_TOKENS for tokens in samples)
    assert any(a != b for a, b in (s for i, s in enumerate(outputs) if i not in ABORTED))  # two samples differ


def test_counts_are_the_tokens_the_engine_ran_aborted_requests_included(lifecycle_runs):
    (worker,) = lifecycle_runs["on"]["workers"]
    assert worker["errors"] == {} and worker["monitoring"] == "ok"
    ran = worker["scheduled_tokens"]  # every step's scheduled tokens
    for gate, mine, engine in zip(worker["gates"], worker["counts"].values(), worker["recorded"].values()):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
        assert sum(mine) == gate["top_k"] * ran
    # the scheduler's account, per request (its n sequences are requests of their own there): the
    # finished ones ran their prompt and each sample to the end; the aborted ones less, and at
    # least one of them ran tokens before it was aborted, which are counted above
    by_request = worker["scheduled_by_request"]
    assert sum(by_request.values()) == ran
    per_prompt = {i: [n for key, n in by_request.items() if f"request-{i}-" in key] for i in range(len(PROMPTS))}
    for index, ran_here in per_prompt.items():
        whole = len(PROMPTS[index]) + MAX_TOKENS - 1
        if index in ABORTED:
            assert all(n < whole for n in ran_here)
        else:
            assert ran_here == [whole] * SAMPLES
    assert sum(sum(per_prompt[i]) for i in ABORTED) > 0


def test_each_windows_requests_are_those_the_scheduler_ran(lifecycle_runs):
    (worker,) = lifecycle_runs["on"]["workers"]
    assert worker["requests_known"] and len(worker["requests"]) > 3
    for tokens, requests, recount in worker["requests"]:
        assert recount is not None and requests == pytest.approx(recount, rel=1e-9), worker["requests"]


def test_samples_are_those_without_moewatch(lifecycle_runs):
    assert lifecycle_runs["on"]["outputs"] == lifecycle_runs["off"]["outputs"]
