"""transformers before 5: its MoE models are not read by router class.

moewatch's adapters read the router modules of transformers 5, which return their decision
(``(logits, weights, indices)``). transformers 4 routes inside the MoE block: a router that is
a plain ``nn.Linear`` returning logits, or a block that returns ``(hidden, router_logits)``.
Read with the adapters of 5, such a model's gates would raise at every call and count nothing,
so attach refuses it and says how to watch it instead: ``gates=`` naming the gate modules, with
``top_k=`` (exact for softmax top-k routers, whose decision is recomputed from their logits).
"""
from __future__ import annotations

import re
import sys
from typing import List, Optional

from torch import nn

from .hf_families import config_int

_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k")


def older_transformers(model: nn.Module) -> Optional[str]:
    """The version of transformers where ``model`` is one of its models and it is older than 5;
    None otherwise (another library's model, or transformers 5 and later)."""
    transformers = sys.modules.get("transformers")
    version = getattr(transformers, "__version__", None)
    if not isinstance(version, str):
        return None
    match = re.match(r"(\d+)\.", version)
    if match is None or int(match.group(1)) >= 5:
        return None
    if not any(type(module).__module__.startswith("transformers.") for module in model.modules()):
        return None
    return version


def suggested_gates(model: nn.Module) -> Optional[str]:
    """The ``gates=``/``top_k=`` arguments that watch an older transformers model whose routers
    are ``nn.Linear`` modules named gate or router, as wide as its config's experts; None where
    none is found."""
    config = getattr(model, "config", None)
    experts, top_k = config_int(config, *_EXPERT_FIELDS), config_int(config, *_TOP_K_FIELDS)
    if experts is None or top_k is None or experts <= 0 or top_k <= 0:
        return None
    patterns: List[str] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == experts
                and name.rsplit(".", 1)[-1] in ("gate", "router")):
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            if pattern not in patterns:
                patterns.append(pattern)
    if not patterns:
        return None
    shown = repr(patterns[0]) if len(patterns) == 1 else repr(patterns)
    return f"gates={shown}, top_k={top_k}"


def older_transformers_message(model: nn.Module, version: str) -> str:
    suggestion = suggested_gates(model)
    how = (f"attach with {suggestion} (exact for softmax top-k routers: the decision is recomputed "
           "from the gate's logits)" if suggestion is not None else
           "name the modules that return the router's logits with gates= and pass top_k= and "
           "scoring= (exact where the decision is a top-k of those scores)")
    return (f"{type(model).__name__} is a model of transformers {version}; moewatch finds the gates of "
            "transformers 5 and later by their router classes, and transformers 4 routes inside its "
            f"MoE blocks, which moewatch cannot read by class. Upgrade transformers (>=5), or {how}")
