"""New weights loaded into a served model in place: moewatch keeps watching the new routing.

Reinforcement-learning trainers update the policy a vLLM engine serves without restarting it
(``reload_weights``: the weights are loaded into the same modules, the compiled graphs stay).
moewatch's hooks sit on those modules and the routers' capture seam, so they must see the
routing of the new weights, exactly, without re-attaching. A real engine (the tiny Mixtral,
compilation on) serves prompts, reloads a checkpoint of other random weights from disk, and
serves the same prompts again.
"""
from __future__ import annotations


import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, one_engine_run, shared_models

pytestmark = pytest.mark.timeout(1500)

PROMPTS = [[(7 * i + j) % 250 + 1 for j in range(10 + 3 * i)] for i in range(4)]
MAX_TOKENS = 8


def _reload_run(core: int) -> dict:
    models = shared_models()
    other = shared_models(seed=5, which="mixtral")["mixtral"]
    config = {"model": models["mixtral"], "eager": False, "multiprocess": False, "moewatch": True,
              "port": free_ports(1), "max_tokens": MAX_TOKENS, "prompts": PROMPTS, "reload": other}
    return engine_result(config, core)


# the run, queued for the session from collection on, and the fixture giving its result
engine_runs_to_queue, reloaded = one_engine_run("reload", _reload_run, "reloaded")


def test_counts_after_an_in_place_reload_are_the_new_weights_routing(reloaded):
    assert reloaded["outputs_reloaded"] != reloaded["outputs"]  # the new weights are the ones served
    (before,) = reloaded["workers"]
    (after,) = reloaded["reloaded_workers"]
    assert after["errors"] == {} and after["monitoring"] == "ok"
    routed_once = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
    for gate, mine, engine, earlier in zip(after["gates"], after["counts"].values(), after["recorded"].values(),
                                          before["counts"].values()):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"  # since attach, both servings
        assert sum(earlier) == gate["top_k"] * routed_once and sum(mine) == 2 * gate["top_k"] * routed_once
