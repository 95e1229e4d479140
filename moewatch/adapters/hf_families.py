"""Adapters for the transformers MoE families whose router returns ``(logits, weights, indices, ...)``.

These "standard" routers all hand back the raw logits [T, E] and the selected expert ids
[T, k] (plus routing weights, and for Inkling shared-expert gammas). moewatch counts the ids
the router returned, so selection rules (bias-corrected, group-limited, sparsemixer, top-k
then softmax) never have to be re-implemented. What differs per family, and is recorded
here: where E and k come from, and how logits turn into the routing distribution used for
probabilities and entropy. Families whose gate returns something else register their own
builder in :mod:`moewatch.adapters.hf_special`, imported at the bottom of this file.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from ..routing import GateInfo, Routing
from .base import AdapterError, FamilyDoc, GateSpec, flat_tokens
from .registry import builder_for, register

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
    "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "longcat_flash", "mellum", "mimo_v2_flash",
    "minimax", "minimax_m2", "minimax_m3_vl", "mistral4", "mistral_large4", "mixtral",
    "muse_spark", "nemotron_h", "olmoe", "openai_privacy_filter", "phimoe", "qwen2_moe",
    "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe", "qwen4_exp",
    "solar_open", "step3p7", "unlimited_ocr",
}

# Config fields holding E and k, for the docs and as the last fallback.
CONFIG_FIELDS: Dict[str, Tuple[str, str]] = {
    "afmoe": ("num_experts", "num_experts_per_tok"),
    "aria": ("moe_num_experts", "moe_topk"),
    "bailing_hybrid": ("num_local_experts", "num_experts_per_tok"),
    "ernie4_5_moe": ("moe_num_experts", "moe_k"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
    "hunyuan_v1_moe": ("num_experts", "moe_topk"),
    "kimi_linear": ("num_local_experts", "num_experts_per_tok"),
    "longcat_flash": ("n_routed_experts", "moe_topk"),
    **{f: ("n_routed_experts", "num_experts_per_tok") for f in (
        "axk1", "axk2", "deepseek_ocr2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
        "dots3_note", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "hy_v4",
        "inkling", "inkling2", "mimo_v2_flash", "mistral4", "mistral_large4", "nemotron_h",
        "solar_open", "unlimited_ocr")},
    **{f: ("num_local_experts", "num_experts_per_tok") for f in (
        "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "minimax",
        "minimax_m2", "minimax_m3_vl", "mixtral", "muse_spark", "openai_privacy_filter", "phimoe",
        "step3p7")},
}
_DEFAULT_FIELDS = ("num_experts", "num_experts_per_tok")

# What a user of a family should know when reading its numbers.
NOTES: Dict[str, str] = {
    "afmoe": "expert_bias of the MoE block is passed to the router; selection only",
    "aria": "top-k on logits, softmax over the k",
    "cohere2_moe": "scoring follows expert_selection_fn (softmax or sigmoid)",
    "deepseek_v2": "optional group-limited greedy selection (group score = max)",
    "deepseek_ocr2": "optional group-limited greedy selection (group score = max)",
    "unlimited_ocr": "optional group-limited greedy selection (group score = max)",
    "ernie4_5_moe": "selection on probabilities + moe_statics.e_score_correction_bias",
    "gpt_oss": "router bias; top-k on logits, softmax over the k",
    "hunyuan_v1_moe": "k may be a per-layer list (moe_topk); each gate reports its own layer's",
    "hy_v3": "bias buffer of the MoE block is passed to the router; selection only",
    "inkling": "router weight also scores the shared experts; only the routed logits are counted",
    "kolibri1": "top-k on logits + bias, sigmoid of the selected",
    "laguna": "logits are reported after the optional tanh softcap",
    "lfm2_moe": "expert_bias of the MoE block (use_expert_bias) is passed to the router",
    "longcat_flash": "E includes the zero-compute (identity) experts: ids >= n_routed_experts",
    "minimax_m2": "bias buffer of the MoE block is passed to the router; selection only",
    "mistral4": "group-limited selection masks with 0.0",
    "axk2": "group-limited selection masks with 0.0 (groups optional)",
    "muse_spark": "logits are reported after output_multiplier",
    "openai_privacy_filter": "top-k on logits, softmax over the k",
    "phimoe": "sparsemixer: always top-2, whatever num_experts_per_tok says",
}
GROUPED_SIGMOID = "sigmoid + e_score_correction_bias for selection; group-limited top-k"
for _f in ("axk1", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32", "dots1", "dots3_note",
           "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa",
           "hy_v4", "kimi_linear", "mimo_v2_flash", "nemotron_h", "solar_open"):
    NOTES.setdefault(_f, GROUPED_SIGMOID)


def scoring_of(family: str) -> str:
    return "sigmoid" if family in SIGMOID_FAMILIES else "softmax"


def module_int(module: nn.Module, *names: str) -> Optional[int]:
    """The first integer attribute of ``module`` among ``names``."""
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _text_configs(config: object):
    yield config
    yield getattr(config, "text_config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        yield get_text()


def config_int(config: object, *names: str, layer: Optional[int] = None) -> Optional[int]:
    """The first integer field among ``names`` in ``config`` (or its text config).

    A per-layer list (HunYuan's ``moe_topk``) is read at ``layer``.
    """
    for cfg in _text_configs(config):
        if cfg is None:
            continue
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, (list, tuple)) and layer is not None and layer < len(v):
                v = v[layer]
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def layer_index(name: str) -> Optional[int]:
    """``model.layers.7.mlp.gate`` -> 7 (the last number in the module name)."""
    numbers = re.findall(r"\.(\d+)(?=\.|$)", name)
    return int(numbers[-1]) if numbers else None


def logits_rows(module: nn.Module) -> Optional[int]:
    """Rows of the router's own projection: a 2-D ``weight``, or its only Linear child."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return int(weight.shape[0])
    linears = [m for m in module.children() if isinstance(m, nn.Linear)]
    return linears[0].out_features if len(linears) == 1 else None


def experts_and_k(name: str, module: nn.Module, config: object, family: str = "") -> Tuple[int, int]:
    """Number of experts E (the width of the logits the router returns) and top-k of one router."""
    e_field, k_field = CONFIG_FIELDS.get(family, _DEFAULT_FIELDS)
    layer = layer_index(name)
    if family == "longcat_flash":
        # logits cover the routed and the zero-compute experts; router.num_experts does not
        num_experts = module_int(module, "n_routed_experts") or logits_rows(module)
    else:
        # router.num_experts first: Inkling's weight also has rows for its shared experts
        num_experts = module_int(module, "num_experts") or logits_rows(module)
    num_experts = num_experts or config_int(config, e_field, "num_local_experts", "n_routed_experts",
                                            "num_experts", "moe_num_experts", layer=layer)
    if family == "phimoe":
        top_k = 2  # sparsemixer picks exactly two experts
    else:
        top_k = module_int(module, "top_k") or config_int(
            config, k_field, "num_experts_per_tok", "moe_topk", "moe_k", "top_k", layer=layer)
    if not num_experts or not top_k:
        raise AdapterError(
            f"could not read the number of experts / top-k of gate {name!r} "
            f"({type(module).__name__}); pass num_experts= and top_k= to moewatch.attach"
        )
    return int(num_experts), int(top_k)


def router_scoring(family: str, module: nn.Module) -> str:
    """softmax or sigmoid: the family default, or what the router module is set to."""
    if family == "cohere2_moe":
        fn = getattr(module, "expert_selection_fn", "softmax")
        return "sigmoid" if fn == "sigmoid" else "softmax"
    return scoring_of(family)


def extract_triple(mod: nn.Module, args: tuple, kwargs: dict, output) -> Routing:
    """(logits [..., E], weights [..., k], indices [..., k], ...) -> Routing."""
    logits = output[0]
    indices = output[2]
    return Routing(logits=flat_tokens(logits, logits.shape[-1]),  # [T, E]
                   indices=flat_tokens(indices, indices.shape[-1]))  # [T, k]


extract_triple.output_only = True  # reads the output alone: may run later, on the reader (hooks.py)
extract_triple.picks = (0, 2)  # it only picks (logits, indices) out of a tuple (hotpath.staged)


def describe(family: str) -> FamilyDoc:
    """The docs entry of a standard family."""
    e_field, k_field = CONFIG_FIELDS.get(family, _DEFAULT_FIELDS)
    if family == "longcat_flash":
        experts = "router `n_routed_experts` (config `n_routed_experts` + `zero_expert_num`)"
    else:
        experts = f"router `num_experts` (config `{e_field}`)"
    top_k = "2 (fixed)" if family == "phimoe" else f"router `top_k` (config `{k_field}`)"
    scoring = "expert_selection_fn" if family == "cohere2_moe" else scoring_of(family)
    return FamilyDoc(scoring=scoring, experts=experts, top_k=top_k, notes=NOTES.get(family, ""))


def triple_builder(family: str):
    """Builder for routers returning (logits, weights, indices, ...)."""

    def build(name: str, module: nn.Module, config: object) -> GateSpec:
        num_experts, top_k = experts_and_k(name, module, config, family)
        info = GateInfo(name=name, num_experts=num_experts, top_k=top_k, family=family,
                        scoring=router_scoring(family, module), notes=NOTES.get(family, ""))
        return GateSpec(info=info, module=module, extract=extract_triple)

    build.doc = describe(family)
    return build


def family_doc(family: str) -> Optional[FamilyDoc]:
    """The :class:`FamilyDoc` a registered builder carries (``builder.doc``), if any."""
    return getattr(builder_for(family), "doc", None)


for _family in sorted(TRIPLE_FAMILIES):
    register(_family)(triple_builder(_family))

# Families with gate outputs of their own register themselves on import.
importlib.import_module(f"{__package__}.hf_special")
