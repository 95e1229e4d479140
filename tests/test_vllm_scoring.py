"""How a vLLM router's scoring is read (``moewatch.engines.vllm.router_scoring``), for the router
layouts the CPU engine of ``tests/test_vllm_families.py`` does not build: vLLM's GPU routers
(``CustomRoutingRouter`` has no ``scoring_func``; the routing method type names the scheme).
The routers here are plain objects with the attributes vLLM's have (this venv has no vLLM)."""
from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest

from moewatch.engines.vllm import router_scoring

Method = enum.Enum("RoutingMethodType", "Default Renormalize DeepSeekV3 Llama4 RenormalizeNaive TopK "
                   "SigmoidRenorm MiniMax2 Sigmoid Unspecified DeepseekV4 Custom Simulated")


def token_choice_with_bias(hidden_states, gating_output, topk, renormalize):  # Cohere2-MoE's, by name
    raise AssertionError("never called")


token_choice_with_bias.__module__ = "vllm.model_executor.models.cohere2_moe"


def sparsemixer(hidden_states, gating_output, topk, renormalize):
    raise AssertionError("never called")


@pytest.mark.parametrize("router, scoring, note", [
    # the router's own field, where no routing function replaces it
    (SimpleNamespace(scoring_func="sigmoid", custom_routing_function=None), "sigmoid", ""),
    (SimpleNamespace(scoring_func="softmax"), "softmax", ""),
    # a GPU router without the field: its routing method type
    (SimpleNamespace(routing_method_type=Method.Llama4), "sigmoid", "Llama4"),
    (SimpleNamespace(routing_method_type=Method.SigmoidRenorm), "sigmoid", "SigmoidRenorm"),
    (SimpleNamespace(routing_method_type=Method.Renormalize), "softmax", ""),
    # a custom routing function replaces the router's field (the CPU router keeps "softmax")
    (SimpleNamespace(scoring_func="softmax", custom_routing_function=token_choice_with_bias,
                     routing_method_type=Method.Custom), "sigmoid", "token_choice_with_bias"),
    (SimpleNamespace(scoring_func="softmax", custom_routing_function=sparsemixer,
                     routing_method_type=Method.Custom), "softmax", "sparsemixer: its scoring is not known"),
    # nothing to go on: softmax, said in the notes
    (SimpleNamespace(), "softmax", "SimpleNamespace: its scoring is not known"),
])
def test_the_scoring_comes_from_what_decides_it(router, scoring, note):
    found, notes = router_scoring(router)
    assert found == scoring
    assert (note in notes) if note else notes == ""
