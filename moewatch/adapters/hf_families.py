"""Adapters for the transformers MoE families.

Most routers return ``(logits [T,E], weights [T,k], indices [T,k])``; they share
:func:`triple_builder`. Families whose gate returns something else register their own
builder in a module of their own and are imported at the bottom of this file.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..routing import GateInfo, Routing
from .base import AdapterError, GateSpec, flat_tokens
from .registry import register

# How the family turns logits into routing scores (for probabilities, entropy, top-1).
SIGMOID_FAMILIES = {
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32",
    "deepseek_v4", "dots1", "dots3_note", "exaone_moe", "flint", "glm4_moe", "glm4_moe_lite",
    "glm4v_moe", "glm5_next", "glm_moe_dsa", "hy_v3", "hy_v4", "inkling", "inkling2",
    "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "llama4", "mimo_v2_flash", "minimax_m2",
    "minimax_m3_vl", "muse_spark", "nemotron_h", "solar_open", "step3p7",
}

# Families whose router returns (logits, weights, indices) as its first three outputs.
TRIPLE_FAMILIES = {
    "afmoe", "aria", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2",
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "dots3_note", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "flint", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next",
    "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling", "inkling2", "jamba",
    "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "mellum", "mimo_v2_flash", "minimax",
    "minimax_m2", "minimax_m3_vl", "mistral4", "mistral_large4", "mixtral", "muse_spark",
    "nemotron_h", "olmoe", "openai_privacy_filter", "phimoe", "qwen2_moe", "qwen3_5_moe",
    "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe", "qwen4_exp", "solar_open",
    "step3p7", "unlimited_ocr",
}


def scoring_of(family: str) -> str:
    return "sigmoid" if family in SIGMOID_FAMILIES else "softmax"


def module_int(module: nn.Module, *names: str) -> Optional[int]:
    """The first integer attribute of ``module`` among ``names``."""
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def config_int(config: object, *names: str) -> Optional[int]:
    """The first integer field among ``names`` in ``config`` (or its text_config)."""
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "get_text_config", lambda: None)()):
        if cfg is None:
            continue
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def experts_and_k(name: str, module: nn.Module, config: object) -> tuple[int, int]:
    """Number of experts E (the width of the logits) and top-k of one router module."""
    weight = getattr(module, "weight", None)
    num_experts = weight.shape[0] if isinstance(weight, nn.Parameter) and weight.dim() == 2 else None
    num_experts = num_experts or module_int(module, "num_experts", "n_routed_experts", "num_local_experts")
    num_experts = num_experts or config_int(
        config, "num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts"
    )
    top_k = module_int(module, "top_k", "num_experts_per_tok", "moe_topk", "k")
    top_k = top_k or config_int(config, "num_experts_per_tok", "moe_topk", "moe_k", "top_k")
    if not num_experts or not top_k:
        raise AdapterError(
            f"could not read the number of experts / top-k of gate {name!r} "
            f"({type(module).__name__}); pass num_experts= and top_k= to moewatch.attach"
        )
    return int(num_experts), int(top_k)


def triple_builder(family: str):
    """Builder for routers returning (logits, weights, indices, ...)."""

    def build(name: str, module: nn.Module, config: object) -> GateSpec:
        num_experts, top_k = experts_and_k(name, module, config)

        def extract(mod, args, kwargs, output) -> Routing:
            logits = flat_tokens(output[0], output[0].shape[-1])  # [T, E]
            indices = flat_tokens(output[2], output[2].shape[-1])  # [T, k]
            return Routing(logits=logits, indices=indices)

        info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family=family,
                        scoring=scoring_of(family))
        return GateSpec(info=info, module=module, extract=extract)

    return build


for _family in sorted(TRIPLE_FAMILIES):
    register(_family)(triple_builder(_family))
