"""Engines made one after another in one process, as an evaluation script goes through
checkpoints: each is watched, and closing one frees what its monitor held.

The first engine's monitor compiles the reader's kernel (numba, and with it llvmlite), and
serves /metrics on ``MOEWATCH_PORT``. Before, the second engine could not start: vLLM's start-up
scans every loaded module's objects and failed on llvmlite's library object, and the first
monitor still held the port. A real in-process engine (the tiny Mixtral, compilation on) serves
prompts, is dropped, and a second one serves them again.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, one_engine_run, shared_models

pytestmark = pytest.mark.timeout(1500)

PROMPTS = [[(5 * i + j) % 250 + 1 for j in range(6 + 4 * i)] for i in range(3)]
MAX_TOKENS = 6


def _in_turn_run(core: int) -> dict:
    config = {"model": shared_models()["mixtral"], "eager": False, "multiprocess": False, "moewatch": True,
              "port": free_ports(1), "max_tokens": MAX_TOKENS, "prompts": PROMPTS, "again": True}
    return engine_result(config, core)


# the run, queued for the session from collection on, and the fixture giving its result
engine_runs_to_queue, in_turn = one_engine_run("in-turn", _in_turn_run, "in_turn")


def test_closing_an_engine_frees_its_metrics_port(in_turn):
    assert in_turn["again"]["port_freed"]


def test_the_next_engine_in_the_process_starts_and_is_watched_exactly(in_turn):
    (first,) = in_turn["workers"]
    (second,) = in_turn["again"]["workers"]
    assert in_turn["again"]["outputs"] == in_turn["outputs"]  # the same model serves the same tokens
    routed = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
    for report in (first, second):
        assert report["errors"] == {} and report["monitoring"] == "ok"
        for gate, mine, engine in zip(report["gates"], report["counts"].values(), report["recorded"].values()):
            assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
            assert sum(mine) == gate["top_k"] * routed  # the second monitor counts its own engine's tokens alone
